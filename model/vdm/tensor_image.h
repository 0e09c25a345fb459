// The one conversion between uint8 image tensors and Image8 (image.h), for
// everything that hands images across the torch boundary: the engine's
// results and previews, the trainer's grids, the tools.
#ifndef VDM_MODEL_VDM_TENSOR_IMAGE_H_
#define VDM_MODEL_VDM_TENSOR_IMAGE_H_

#include <ATen/core/Tensor.h>

#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/image.h"

namespace vdm {

// uint8 [n, C, H, W] (any device) -> n images.
std::vector<Image8> ToImages(const at::Tensor& pixels_uint8);

// n images of one shape -> uint8 [n, C, H, W] on the CPU. Fails when the
// images differ in shape from `shape` or from each other.
absl::StatusOr<at::Tensor> ToTensor(const std::vector<Image8>& images,
                                    const ImageShape& shape);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_TENSOR_IMAGE_H_
