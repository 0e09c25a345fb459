// Image datasets for the trainer: IDX files (Fashion-MNIST layout) loaded
// into uint8 tensors and checked against the model's shape and classes.
// Plain functions and a value type: thread-compatible.
#ifndef VDM_MODEL_TRAIN_DATASET_H_
#define VDM_MODEL_TRAIN_DATASET_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

// Images with their labels, on the CPU.
struct Dataset {
  at::Tensor images;  // uint8 [N, C, H, W]
  at::Tensor labels;  // int64 [N]
  int64_t size() const { return images.defined() ? images.size(0) : 0; }
  // Rows [begin, end) as a view.
  Dataset Slice(int64_t begin, int64_t end) const;
};

// Reads `<dir>/<split>-images-idx3-ubyte[.gz]` and
// `<dir>/<split>-labels-idx1-ubyte[.gz]` (split is "train" or "t10k"),
// keeping the first `limit` images when limit > 0. Fails with a message that
// names the problem: a missing file, images whose shape differs from `shape`,
// a label count that differs from the image count, or a label >= num_classes
// (when num_classes > 0; an unconditional model ignores labels).
absl::StatusOr<Dataset> LoadIdxDataset(const std::string& dir,
                                       const std::string& split,
                                       const ImageShape& shape, int num_classes,
                                       int64_t limit = 0);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_DATASET_H_
