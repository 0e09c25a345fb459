#include "model/train/vlb.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/vdm/autocast.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/request.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/torchscript_model.h"

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

absl::StatusOr<VlbTerms> ComputeVlb(torch::jit::Module& module,
                                    const ModelInfo& info, const at::Tensor& x,
                                    const at::Tensor& labels,
                                    const at::Tensor& t, at::Generator& gen,
                                    const Weighting& weighting,
                                    ScheduleGraph* schedule, bool bf16) {
  const int64_t b = x.size(0);
  if (b == 0 || t.dim() != 1 || t.size(0) % b != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ComputeVlb: ", t.numel(), " times for ", b, " images"));
  }
  const int64_t k = t.size(0) / b;
  const bool create_graph = at::GradMode::is_enabled();
  VDM_ASSIGN_OR_RETURN(
      GammaValues gamma_t,
      GammaWithDerivative(module, t, info.device, create_graph));
  if (schedule != nullptr && create_graph) {
    schedule->graph = gamma_t;
    schedule->gamma_leaf = gamma_t.gamma.detach().requires_grad_(true);
    schedule->dgamma_leaf = gamma_t.dgamma_dt.detach().requires_grad_(true);
    gamma_t = GammaValues{schedule->gamma_leaf, schedule->dgamma_leaf};
  }
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
    at::Tensor z = Diffuse(f_rep, gamma_t.gamma, eps);
    at::Tensor label = labels.to(info.device).to(at::kLong);
    if (k > 1) label = label.repeat_interleave(k, 0);
    at::Tensor out;
    {
      Bf16Autocast autocast(bf16, info.device.type());
      out = module.forward({z, gamma_t.gamma, label}).toTensor();
    }
    out = out.to(at::kFloat);
    if (out.sizes() != z.sizes()) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward returned shape ", c10::str(out.sizes()),
                       ", expected ", c10::str(z.sizes())));
    }
    at::Tensor eps_hat = ToEps(info.prediction, out, z, gamma_t.gamma);
    at::Tensor rows = DiffusionLossContinuous(eps, eps_hat, gamma_t.dgamma_dt);
    terms.diffusion = rows.view({b, k}).mean(1);
    at::Tensor weighted_rows =
        weighting.kind == Weighting::Kind::kElbo
            ? rows
            : rows * LossWeight(weighting, gamma_t.gamma.detach());
    terms.weighted_diffusion =
        weighting.kind == Weighting::Kind::kElbo
            ? terms.diffusion
            : weighted_rows.view({b, k}).mean(1);
    if (schedule != nullptr) schedule->rows = weighted_rows.detach();
    return terms;
  } catch (const c10::Error& e) {
    return TorchError("VLB", e);
  }
}

absl::StatusOr<EvalResult> EvaluateBpd(torch::jit::Module& module,
                                       const ModelInfo& info,
                                       const Dataset& data,
                                       const EvalOptions& options,
                                       at::Tensor* per_image) {
  const int64_t n = data.size();
  if (n == 0) return absl::InvalidArgumentError("evaluation set is empty");
  // The same module, seen through the library's Denoiser interface.
  TorchScriptModel::Options model_options;
  model_options.device = info.device.str();
  model_options.check_forward = false;
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<TorchScriptModel> model,
                       TorchScriptModel::FromModule(module, model_options));
  const bool conditional = options.conditional && info.num_classes > 0;
  ScoreOptions score;
  score.likelihood.times = std::max(1, options.times);
  score.batch_rows = std::max<int64_t>(1, options.batch_rows);
  score.stop = options.stop;
  const int64_t chunk = std::max<int64_t>(1, options.chunk_images);
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> prior, recon, diffusion;
  for (int64_t begin = 0, c = 0; begin < n; begin += chunk, ++c) {
    if (options.stop != nullptr && options.stop->load()) {
      return absl::CancelledError("evaluation interrupted");
    }
    const Dataset part = data.Slice(begin, std::min(n, begin + chunk));
    score.seed = ChunkSeed(options.seed, c);
    score.labels = conditional
                       ? part.labels
                       : at::full({part.size()}, info.num_classes, at::kLong);
    VDM_ASSIGN_OR_RETURN(BpdScores s,
                         ScoreImages(*model, part.images, score));
    prior.push_back(s.prior);
    recon.push_back(s.recon);
    diffusion.push_back(s.diffusion);
  }
  at::Tensor p = at::cat(prior), r = at::cat(recon), d = at::cat(diffusion);
  at::Tensor total = p + r + d;
  if (per_image != nullptr) *per_image = total;
  EvalResult result;
  result.images = n;
  result.times = score.likelihood.times;
  result.conditional = conditional;
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
