// The noise schedule in training (Kingma et al. 2021, "Variational Diffusion
// Models", section 5): which of a TorchScript model's parameters belong to
// gamma(t), and the gradient that learns its shape by minimising the
// variance of the VLB estimator. The continuous-time VLB depends on the
// schedule only through its endpoints gamma(0), gamma(1); the variance of its
// Monte Carlo estimate depends on the whole shape. So the endpoints take the
// VLB's gradient and the shape the gradient of E[L^2] (= Var[L] + a constant
// in the shape), where L is the per-example diffusion loss 0.5 gamma'(t)
// ||eps - eps_hat||^2. Since d L^2 / d eta = 2 L dL / d eta, that gradient is
// the VLB's gradient at gamma(t) and gamma'(t), scaled per example by 2 L,
// pushed through the schedule's network only: one backward pass of the big
// network serves both. Plain functions: thread-compatible.
#ifndef VDM_MODEL_TRAIN_SCHEDULE_H_
#define VDM_MODEL_TRAIN_SCHEDULE_H_

#include <torch/script.h>

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

// vdm-train --schedule: kFixed trains no parameter of gamma (today's
// behaviour); kLearnedEndpoints gives gamma_min / gamma_max the VLB
// gradient; kLearned also gives the shape (gamma_net.*) the variance
// gradient.
enum class ScheduleKind { kFixed, kLearnedEndpoints, kLearned };

// "fixed", "learned_endpoints" or "learned".
absl::StatusOr<ScheduleKind> ParseSchedule(const std::string& name);
std::string ScheduleName(ScheduleKind kind);

// Parameter names of the schedule (model/net/vdm_net.py): the endpoints are
// top-level parameters named gamma_* (gamma_min, gamma_max), the shape is
// every parameter under the gamma_net submodule.
bool IsScheduleEndpoint(const std::string& name);
bool IsScheduleShape(const std::string& name);

// gamma(t) and gamma'(t) as the loss saw them: `graph` keeps the graph to
// the schedule's parameters; `gamma_leaf` / `dgamma_leaf` are detached
// copies (leaves that require grad) that the rest of the loss used, so that
// after the loss's backward their .grad() holds dLoss/dgamma(t_i) and
// dLoss/dgamma'(t_i) without having reached the schedule. `rows` is the
// per-row diffusion loss the variance is of (nats, [B*K], detached).
struct ScheduleGraph {
  GammaValues graph;
  at::Tensor gamma_leaf;
  at::Tensor dgamma_leaf;
  at::Tensor rows;
};

// The VLB gradient of the endpoints through gamma(t) and gamma'(t), given
// the leaves' gradients: autograd::grad({gamma, gamma'}, endpoints,
// {dL/dgamma, dL/dgamma'}). Keeps the graph (for the shape's pass).
std::vector<at::Tensor> EndpointGradient(const ScheduleGraph& g,
                                         const std::vector<at::Tensor>& params);

// d/d shape of mean_i (L_i)^2 where the loss's mean_i L_i has leaf gradients
// g_i = dLoss/dgamma_i, h_i = dLoss/dgamma'_i and `loss_rows` [N] holds L_i in
// the loss's units: autograd::grad({gamma, gamma'}, shape, {2 L g, 2 L h}).
// Frees the graph. Undefined gradients (unused parameters) become zeros.
std::vector<at::Tensor> VarianceGradient(const ScheduleGraph& g,
                                         const at::Tensor& loss_rows,
                                         const std::vector<at::Tensor>& params);

// gamma at n evenly spaced t in [0, 1] (t = i / (n - 1)), as (t, gamma).
absl::StatusOr<std::vector<std::pair<double, double>>> ScheduleCurve(
    torch::jit::Module& module, const torch::Device& device, int n = 11);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_SCHEDULE_H_
