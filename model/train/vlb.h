// The continuous-time VDM variational bound (design.md section 4) of a
// TorchScript model on a batch of images, for training (differentiable) and
// for evaluation (dataset BPD with stratified times and standard error).
// Plain functions over a module the caller owns: thread-compatible.
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
#include "model/vdm/denoiser.h"

namespace vdm {

// What the loss needs to know about a model (from the contract).
struct ModelInfo {
  ImageShape shape;
  int num_classes = 0;     // 0 = unconditional; label num_classes = no label
  std::string prediction;  // "eps", "v" or "x"
  torch::Device device = torch::kCPU;
};

// gamma(t) and d gamma / dt by autograd on t [B] f32. With create_graph the
// derivative stays differentiable w.r.t. the schedule's parameters (learned
// endpoints) and gamma's graph is kept for a later backward.
absl::StatusOr<std::pair<at::Tensor, at::Tensor>> GammaWithDerivative(
    torch::jit::Module& module, const at::Tensor& t, bool create_graph);

// The three VLB terms in nats per image, [B] each.
struct VlbTerms {
  at::Tensor prior;
  at::Tensor recon;
  at::Tensor diffusion;  // averaged over the K times of each image
  at::Tensor Total() const { return prior + recon + diffusion; }
};

// VLB terms of images x [B,C,H,W] uint8 with labels [B] i64 (already with
// "no label" entries where wanted) at times t [B*K] f32, image-major (row
// i*K + k is image i at its k-th time). Noise comes from `gen` (CPU).
// Differentiable w.r.t. the module's parameters unless grad mode is off;
// gamma' is by autograd on t either way.
absl::StatusOr<VlbTerms> ComputeVlb(torch::jit::Module& module,
                                    const ModelInfo& info, const at::Tensor& x,
                                    const at::Tensor& labels,
                                    const at::Tensor& t, at::Generator& gen);

struct EvalOptions {
  int times = 1;             // K stratified times per image
  int64_t batch_rows = 256;  // network rows (images * K) per forward pass
  bool conditional = false;  // true: the images' labels; false: "no label"
  uint64_t seed = 0;         // same seed => same estimate
  const std::atomic<bool>* stop = nullptr;  // set => Cancelled between batches
};

// A dataset's mean BPD and its parts; stderr_bpd is the standard error of
// the mean over images (each image's estimate averages its K times, each
// image has its own time offset u).
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

// Evaluates `data` without parameter gradients.
absl::StatusOr<EvalResult> EvaluateBpd(torch::jit::Module& module,
                                       const ModelInfo& info,
                                       const Dataset& data,
                                       const EvalOptions& options);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_VLB_H_
