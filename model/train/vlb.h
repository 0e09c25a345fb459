// The continuous-time VDM variational bound (docs/design.md, "The maths") of
// a TorchScript model on a batch of images: the differentiable training loss
// (ComputeVlb), and the dataset BPD of evaluation (EvaluateBpd), which scores
// with the library's LikelihoodPlan (model/vdm/likelihood.h), the same code,
// seed layout and estimator the server's ScoreBPD uses. Plain functions over
// a module the caller owns: thread-compatible.
#ifndef VDM_MODEL_TRAIN_VLB_H_
#define VDM_MODEL_TRAIN_VLB_H_

#include <ATen/core/Generator.h>
#include <torch/script.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "model/train/dataset.h"
#include "model/train/schedule.h"
#include "model/vdm/denoiser.h"

namespace vdm {

// What the loss needs to know about a model (from the contract).
struct ModelInfo {
  ImageShape shape;
  int num_classes = 0;     // 0 = unconditional; label num_classes = no label
  std::string prediction;  // "eps", "v" or "x"
  torch::Device device = torch::kCPU;
};

// The weighting of the diffusion loss over log-SNR lambda = -gamma (VDM++,
// Kingma & Gao 2023): L_w = 0.5 E_t[w(lambda_t) gamma'(t) ||eps - eps_hat||^2].
// kElbo (w = 1) is the VLB; kSigmoid, w = sigmoid(-lambda + bias) =
// sigmoid(gamma + bias), is monotone in lambda, so L_w is still an ELBO of
// noise-augmented data; it puts less weight on low noise levels.
struct Weighting {
  enum class Kind { kElbo, kSigmoid };
  Kind kind = Kind::kElbo;
  double bias = 2.0;  // b of the sigmoid weighting
};

// Parses "elbo" or "sigmoid"; the name of a Weighting::Kind.
absl::StatusOr<Weighting::Kind> ParseWeighting(const std::string& name);
std::string WeightingName(Weighting::Kind kind);

// w(lambda) per row for gamma [N] (a tensor of ones for kElbo).
at::Tensor LossWeight(const Weighting& weighting, const at::Tensor& gamma);

// The three VLB terms in nats per image, [B] each, and the weighted
// diffusion loss that training minimizes.
struct VlbTerms {
  at::Tensor prior;
  at::Tensor recon;
  at::Tensor diffusion;  // averaged over the K times of each image
  // 0.5 w(lambda_t) gamma'(t) ||eps - eps_hat||^2, averaged over the K
  // times; the same tensor as `diffusion` for the ELBO weighting.
  at::Tensor weighted_diffusion;
  at::Tensor Total() const { return prior + recon + diffusion; }
  // The training loss: the VLB with the diffusion term weighted.
  at::Tensor Loss() const { return prior + recon + weighted_diffusion; }
};

// VLB terms of images x [B,C,H,W] uint8 with labels [B] i64 (already with
// "no label" entries where wanted) at times t [B*K] f32, image-major (row
// i*K + k is image i at its k-th time). Noise comes from `gen` (CPU).
// Differentiable w.r.t. the module's parameters unless grad mode is off;
// gamma' is by autograd on t either way. With `schedule` (and grad mode on)
// the diffusion term sees gamma(t), gamma'(t) through detached leaves and
// `schedule` gets them with their graph (schedule.h): the loss's backward
// then stops at the leaves, and the caller routes their gradients to the
// schedule's parameters (the prior and reconstruction terms keep their
// direct graph to gamma(0), gamma(1)). Without it, the computation (and so
// the training of a fixed schedule) is unchanged. With `bf16` the network's
// forward pass (only it: gamma, the noise and the loss stay fp32) runs under
// bf16 autocast (model/vdm/autocast.h; vdm-train --precision=bf16) and its
// output is cast back to fp32; the parameters and their gradients stay fp32.
absl::StatusOr<VlbTerms> ComputeVlb(torch::jit::Module& module,
                                    const ModelInfo& info, const at::Tensor& x,
                                    const at::Tensor& labels,
                                    const at::Tensor& t, at::Generator& gen,
                                    const Weighting& weighting = {},
                                    ScheduleGraph* schedule = nullptr,
                                    bool bf16 = false);

struct EvalOptions {
  int times = 1;             // K times per image (LikelihoodOptions::times)
  int64_t batch_rows = 256;  // network rows (images * K) per forward pass
  bool conditional = false;  // true: the images' labels; false: "no label"
  // Chunk c of chunk_images images is scored with seed ChunkSeed(seed, c)
  // (model/vdm/request.h), as `vdm-client score --chunk` does; a set of at
  // most chunk_images images gets exactly the scores ScoreBPD returns for
  // the same images, K and seed (independent noise, no label or the label).
  uint64_t seed = 0;
  int64_t chunk_images = 256;
  const std::atomic<bool>* stop = nullptr;  // set => Cancelled between batches
};

// A dataset's mean BPD and its parts; stderr_bpd is the standard error of
// the mean over images (each image's estimate averages its K times, each
// image has its own time offsets).
struct EvalResult {
  int64_t images = 0;
  int times = 0;
  bool conditional = false;
  double bpd = 0;
  double prior = 0;
  double recon = 0;
  double diffusion = 0;
  double stderr_bpd = 0;
};

// Evaluates `data` without parameter gradients. Per-image scores are
// returned through `per_image` when it is not null ([n] float64 BPD).
absl::StatusOr<EvalResult> EvaluateBpd(torch::jit::Module& module,
                                       const ModelInfo& info,
                                       const Dataset& data,
                                       const EvalOptions& options,
                                       at::Tensor* per_image = nullptr);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_VLB_H_
