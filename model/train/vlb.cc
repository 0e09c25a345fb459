#include "model/train/vlb.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

absl::Status TorchError(const char* what, const c10::Error& e) {
  return absl::InternalError(
      absl::StrCat(what, ": ", e.what_without_backtrace()));
}

at::Tensor Randn(at::IntArrayRef sizes, at::Generator& gen,
                 const torch::Device& device) {
  return at::randn(sizes, gen, at::TensorOptions().dtype(at::kFloat))
      .to(device);
}

}  // namespace

absl::StatusOr<Weighting::Kind> ParseWeighting(const std::string& name) {
  if (name == "elbo") return Weighting::Kind::kElbo;
  if (name == "sigmoid") return Weighting::Kind::kSigmoid;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown loss weighting '", name, "' (want elbo or sigmoid)"));
}

std::string WeightingName(Weighting::Kind kind) {
  return kind == Weighting::Kind::kSigmoid ? "sigmoid" : "elbo";
}

at::Tensor LossWeight(const Weighting& weighting, const at::Tensor& gamma) {
  if (weighting.kind == Weighting::Kind::kElbo) return at::ones_like(gamma);
  // lambda = -gamma: sigmoid(-lambda + b) = sigmoid(gamma + b).
  return at::sigmoid(gamma + weighting.bias);
}

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> GammaWithDerivative(
    torch::jit::Module& module, const at::Tensor& t, bool create_graph) {
  try {
    torch::AutoGradMode grad_mode(true);
    at::Tensor tt = t.detach().to(at::kFloat).requires_grad_(true);
    at::Tensor gamma = module.run_method("gamma", tt).toTensor();
    if (gamma.sizes() != tt.sizes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("gamma(t) returned shape ", c10::str(gamma.sizes()),
                       " for t of shape ", c10::str(tt.sizes())));
    }
    if (!gamma.requires_grad()) {
      return absl::InvalidArgumentError("gamma(t) does not depend on t");
    }
    std::vector<at::Tensor> grads = torch::autograd::grad(
        {gamma}, {tt}, {at::ones_like(gamma)}, /*retain_graph=*/create_graph,
        create_graph, /*allow_unused=*/true);
    if (!grads[0].defined()) {
      return absl::InvalidArgumentError("gamma(t) does not depend on t");
    }
    if (create_graph) return std::make_pair(gamma, grads[0]);
    return std::make_pair(gamma.detach(), grads[0].detach());
  } catch (const c10::Error& e) {
    return TorchError("gamma(t)", e);
  }
}

absl::StatusOr<VlbTerms> ComputeVlb(torch::jit::Module& module,
                                    const ModelInfo& info, const at::Tensor& x,
                                    const at::Tensor& labels,
                                    const at::Tensor& t, at::Generator& gen,
                                    const Weighting& weighting) {
  const int64_t b = x.size(0);
  if (b == 0 || t.dim() != 1 || t.size(0) % b != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeVlb: ", t.numel(), " times for ", b, " images"));
  }
  const int64_t k = t.size(0) / b;
  const bool create_graph = at::GradMode::is_enabled();
  VDM_ASSIGN_OR_RETURN(
      auto gamma_t,
      GammaWithDerivative(module, t.to(info.device), create_graph));
  try {
    VlbTerms terms;
    at::Tensor xd = x.to(info.device);
    at::Tensor f = ToModelSpace(xd);
    at::Tensor ends = at::tensor({0.0f, 1.0f}).to(info.device);
    at::Tensor gamma01 = module.run_method("gamma", ends).toTensor();
    {
      // With fixed endpoints these terms have no gradient: keep no graph
      // (the decoder's [B, D, 256] logits are the largest tensors here).
      torch::AutoGradMode grad_mode(gamma01.requires_grad());
      terms.prior = PriorKl(f, gamma01[1].expand({b}));
      terms.recon = ReconstructionNll(xd, gamma01[0].expand({b}),
                                      Randn(f.sizes(), gen, info.device));
    }

    at::Tensor f_rep = k > 1 ? f.repeat_interleave(k, 0) : f;
    at::Tensor eps = Randn(f_rep.sizes(), gen, info.device);
    at::Tensor z = Diffuse(f_rep, gamma_t.first, eps);
    at::Tensor label = labels.to(info.device).to(at::kLong);
    if (k > 1) label = label.repeat_interleave(k, 0);
    at::Tensor out = module.forward({z, gamma_t.first, label}).toTensor();
    if (out.sizes() != z.sizes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward returned shape ", c10::str(out.sizes()),
                       ", expected ", c10::str(z.sizes())));
    }
    at::Tensor eps_hat = ToEps(info.prediction, out, z, gamma_t.first);
    at::Tensor rows = DiffusionLossContinuous(eps, eps_hat, gamma_t.second);
    terms.diffusion = rows.view({b, k}).mean(1);
    terms.weighted_diffusion =
        weighting.kind == Weighting::Kind::kElbo
            ? terms.diffusion
            : (rows * LossWeight(weighting, gamma_t.first.detach()))
                  .view({b, k})
                  .mean(1);
    return terms;
  } catch (const c10::Error& e) {
    return TorchError("VLB", e);
  }
}

absl::StatusOr<EvalResult> EvaluateBpd(torch::jit::Module& module,
                                       const ModelInfo& info,
                                       const Dataset& data,
                                       const EvalOptions& options) {
  const int64_t n = data.size();
  const int k = std::max(1, options.times);
  if (n == 0) return absl::InvalidArgumentError("evaluation set is empty");
  const int64_t chunk = std::max<int64_t>(1, options.batch_rows / k);
  const int64_t dims = info.shape.dims();
  at::Generator gen = at::detail::createCPUGenerator(options.seed);
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> prior, recon, diffusion;
  for (int64_t begin = 0; begin < n; begin += chunk) {
    if (options.stop != nullptr && options.stop->load()) {
      return absl::CancelledError("evaluation interrupted");
    }
    const Dataset part = data.Slice(begin, std::min(n, begin + chunk));
    const int64_t b = part.size();
    // An independent offset u per image: t_ik = (k + u_i) / K.
    at::Tensor u = at::rand({b, 1}, gen, at::TensorOptions(at::kFloat));
    at::Tensor t =
        ((at::arange(k, at::kFloat).view({1, k}) + u) / k).reshape({b * k});
    at::Tensor labels = options.conditional && info.num_classes > 0
                            ? part.labels
                            : at::full({b}, info.num_classes, at::kLong);
    VDM_ASSIGN_OR_RETURN(VlbTerms terms,
                         ComputeVlb(module, info, part.images, labels, t, gen));
    prior.push_back(NatsToBpd(terms.prior, dims).to(at::kDouble).cpu());
    recon.push_back(NatsToBpd(terms.recon, dims).to(at::kDouble).cpu());
    diffusion.push_back(NatsToBpd(terms.diffusion, dims).to(at::kDouble).cpu());
  }
  at::Tensor p = at::cat(prior), r = at::cat(recon), d = at::cat(diffusion);
  at::Tensor total = p + r + d;
  EvalResult result;
  result.images = n;
  result.times = k;
  result.conditional = options.conditional && info.num_classes > 0;
  result.bpd = total.mean().item<double>();
  result.prior = p.mean().item<double>();
  result.recon = r.mean().item<double>();
  result.diffusion = d.mean().item<double>();
  result.stderr_bpd =
      n > 1 ? total.std().item<double>() / std::sqrt(static_cast<double>(n))
            : 0.0;
  if (!std::isfinite(result.bpd)) {
    return absl::InternalError("evaluation BPD is not finite");
  }
  return result;
}

}  // namespace vdm
