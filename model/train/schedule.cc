#include "model/train/schedule.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/torchscript_model.h"

namespace vdm {
namespace {

std::vector<at::Tensor> GradOrZeros(std::vector<at::Tensor> grads,
                                    const std::vector<at::Tensor>& params) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) grads[i] = at::zeros_like(params[i]);
  }
  return grads;
}

at::Tensor LeafGrad(const at::Tensor& leaf) {
  return leaf.grad().defined() ? leaf.grad() : at::zeros_like(leaf);
}

}  // namespace

absl::StatusOr<ScheduleKind> ParseSchedule(const std::string& name) {
  if (name == "fixed") return ScheduleKind::kFixed;
  if (name == "learned_endpoints") return ScheduleKind::kLearnedEndpoints;
  if (name == "learned") return ScheduleKind::kLearned;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown schedule '", name,
      "' (want fixed, learned_endpoints or learned)"));
}

std::string ScheduleName(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kLearnedEndpoints:
      return "learned_endpoints";
    case ScheduleKind::kLearned:
      return "learned";
    case ScheduleKind::kFixed:
      break;
  }
  return "fixed";
}

bool IsScheduleEndpoint(const std::string& name) {
  return name.rfind("gamma_", 0) == 0 && name.find('.') == std::string::npos;
}

bool IsScheduleShape(const std::string& name) {
  return name.rfind("gamma_net.", 0) == 0;
}

std::vector<at::Tensor> EndpointGradient(
    const ScheduleGraph& g, const std::vector<at::Tensor>& params) {
  if (params.empty()) return {};
  return GradOrZeros(
      torch::autograd::grad({g.graph.gamma, g.graph.dgamma_dt}, params,
                            {LeafGrad(g.gamma_leaf), LeafGrad(g.dgamma_leaf)},
                            /*retain_graph=*/true, /*create_graph=*/false,
                            /*allow_unused=*/true),
      params);
}

std::vector<at::Tensor> VarianceGradient(
    const ScheduleGraph& g, const at::Tensor& loss_rows,
    const std::vector<at::Tensor>& params) {
  if (params.empty()) return {};
  const at::Tensor scale = 2.0 * loss_rows.detach().to(g.gamma_leaf.dtype());
  return GradOrZeros(
      torch::autograd::grad(
          {g.graph.gamma, g.graph.dgamma_dt}, params,
          {scale * LeafGrad(g.gamma_leaf), scale * LeafGrad(g.dgamma_leaf)},
          /*retain_graph=*/false, /*create_graph=*/false,
          /*allow_unused=*/true),
      params);
}

absl::StatusOr<std::vector<std::pair<double, double>>> ScheduleCurve(
    torch::jit::Module& module, const torch::Device& device, int n) {
  n = std::max(n, 2);
  const at::Tensor t = at::linspace(0.0, 1.0, n, at::kFloat);
  VDM_ASSIGN_OR_RETURN(GammaValues g,
                       GammaWithDerivative(module, t, device, false));
  const at::Tensor gamma = g.gamma.to(at::kCPU).to(at::kDouble);
  std::vector<std::pair<double, double>> out;
  for (int i = 0; i < n; ++i) {
    out.emplace_back(t[i].item<double>(), gamma[i].item<double>());
  }
  return out;
}

}  // namespace vdm
