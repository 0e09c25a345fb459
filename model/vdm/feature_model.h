// A perceptual feature network for the `thorough` anomaly level: a
// TorchScript module with features(f [B, C, H, W] float32 in model space)
// -> [B, D], local_features(f) -> [B, C', h, w] (a feature per cell of a
// grid over the image; optional here, needed by the thorough level's local
// group) and int attributes image_channels, image_height, image_width
// (model/net/classifier.py exports one; vdm-server finds it beside the model
// as <model>.features.pt, as it finds the calibration). Distances between
// images in its space stand in for LPIPS, trained on the model's own
// training split (docs/anomaly.md, "The thorough level").
//
// Thread-safe: Features serializes its callers.
#ifndef VDM_MODEL_VDM_FEATURE_MODEL_H_
#define VDM_MODEL_VDM_FEATURE_MODEL_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

class FeatureModel {
 public:
  // Loads the module and runs features() once at batch 2; errors start
  // with the path and name what is missing.
  static absl::StatusOr<std::unique_ptr<FeatureModel>> Load(
      const std::string& path);
  ~FeatureModel();

  const std::string& path() const { return path_; }
  const ImageShape& shape() const { return shape_; }
  int64_t dimension() const { return dimension_; }

  // float32 [N, D] features of uint8 images [N, C, H, W] of shape(), in
  // batches of `batch`.
  absl::StatusOr<at::Tensor> Features(const at::Tensor& images,
                                      int64_t batch = 256) const;
  // Whether it has local_features(f), and float32 [N, C', h, w] of it
  // (FAILED_PRECONDITION without it).
  bool has_local_features() const { return has_local_features_; }
  absl::StatusOr<at::Tensor> LocalFeatures(const at::Tensor& images,
                                           int64_t batch = 256) const;

 private:
  // `method` on the images in batches; its result has `dims` dimensions.
  absl::StatusOr<at::Tensor> Run(const char* method, const at::Tensor& images,
                                 int64_t batch, int64_t dims) const;
  struct Impl;
  explicit FeatureModel(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::string path_;
  ImageShape shape_;
  int64_t dimension_ = 0;
  bool has_local_features_ = false;
};

}  // namespace vdm

#endif  // VDM_MODEL_VDM_FEATURE_MODEL_H_
