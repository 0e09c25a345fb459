// Image datasets for the trainer: IDX files (Fashion-MNIST layout) or folders
// of PNGs, loaded into uint8 tensors and checked against the model's shape
// and classes.
// Plain functions and a value type: thread-compatible.
#ifndef VDM_MODEL_TRAIN_DATASET_H_
#define VDM_MODEL_TRAIN_DATASET_H_

#include <ATen/core/Generator.h>
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

// The images of `data` whose label is not `label`, in their order (a copy).
Dataset WithoutClass(const Dataset& data, int64_t label);

// Ren et al. 2019's perturbation for training a background model: a copy of
// `images` (uint8 [B, ...]) where each pixel (each element) is replaced, with
// probability `rate` in [0, 1), by a value uniform in 0..255. Draws from
// `gen` (two draws per element, whatever `rate`), so the result is a
// function of the generator's state.
at::Tensor MutatePixels(const at::Tensor& images, double rate,
                        at::Generator& gen);

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

// Reads a folder of PNG images. Either `dir` holds *.png files (unlabeled:
// label = num_classes, "no label") or subfolders named 0..num_classes-1 of
// *.png files (labeled by folder), not both. Images are decoded to the
// model's channels (gray or RGB) and must have its height and width. They
// are shuffled in a fixed order (independent of any seed), so a split into
// training and validation images takes every class. `limit` > 0 keeps the
// first `limit` after shuffling. Errors name the file or folder at fault.
absl::StatusOr<Dataset> LoadPngDataset(const std::string& dir,
                                       const ImageShape& shape, int num_classes,
                                       int64_t limit = 0);

// `dir` as a dataset of either kind for `split` ("train" or "t10k"):
// - IDX files: `dir` holds train-images-idx3-ubyte[.gz] (LoadIdxDataset);
// - PNGs: for "train", `dir/train/` if it exists, else `dir` itself; for
//   "t10k", `dir/test/` (or `dir/t10k/`), and an empty Dataset when neither
//   exists (no test set).
absl::StatusOr<Dataset> LoadDataset(const std::string& dir,
                                    const std::string& split,
                                    const ImageShape& shape, int num_classes,
                                    int64_t limit = 0);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_DATASET_H_
