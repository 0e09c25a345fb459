// Sample grids for looking at a model while it trains: deterministic DDIM
// (eta = 0) with classifier-free guidance, one row per class, drawn with the
// library's SamplingPlan (model/vdm/samplers.h) exactly as the server would.
// Plain functions over a module the caller owns: thread-compatible.
#ifndef VDM_MODEL_TRAIN_PREVIEW_H_
#define VDM_MODEL_TRAIN_PREVIEW_H_

#include <torch/script.h>

#include <atomic>
#include <cstdint>

#include "absl/status/statusor.h"
#include "model/train/vlb.h"
#include "model/vdm/image_io.h"

namespace vdm {

struct SampleGridOptions {
  int per_class = 8;      // images per row (one row per class)
  int steps = 50;         // DDIM steps from t = 1 to t = 0
  double guidance = 3.0;  // classifier-free guidance scale (1 = plain)
  uint64_t seed = 0;      // same seed => same grid
  const std::atomic<bool>* stop = nullptr;  // set => Cancelled between steps
};

// Samples num_classes rows of per_class images (one row without a label for
// an unconditional model) and tiles them into a grid, row c = class c.
absl::StatusOr<Image8> SampleGrid(torch::jit::Module& module,
                                  const ModelInfo& info,
                                  const SampleGridOptions& options);

// The same samples as uint8 [N, C, H, W], row-major by class, and their
// labels [N] (num_classes for "no label").
absl::StatusOr<std::pair<at::Tensor, at::Tensor>> SampleGuided(
    torch::jit::Module& module, const ModelInfo& info,
    const SampleGridOptions& options);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_PREVIEW_H_
