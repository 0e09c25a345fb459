// Checking guided samples with an image classifier (issue 4: at guidance 3,
// nine in ten samples should be classified as the class asked for).
// ImageClassifier wraps a TorchScript classifier exported by
// model/net/classifier.py; CheckGuidedSamples samples n images per class from
// a generator with classifier-free guidance and classifies them.
// Thread-compatible: one caller at a time per object.
#ifndef VDM_TOOLS_CLASSIFIER_H_
#define VDM_TOOLS_CLASSIFIER_H_

#include <torch/script.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/sampler_config.h"

namespace vdm {

// A TorchScript module with forward(f [B,C,H,W] float32 in model space
// f = 2 (x + 0.5) / 256 - 1) -> logits [B, num_classes], and int attributes
// num_classes, image_channels, image_height, image_width.
class ImageClassifier {
 public:
  // Loads and checks the module (attributes, one forward at batch 2); the
  // error names what is missing or wrong.
  static absl::StatusOr<std::unique_ptr<ImageClassifier>> Load(
      const std::string& path);

  int num_classes() const { return num_classes_; }
  const ImageShape& shape() const { return shape_; }
  // Class names from the metadata's "classes" (else "0", "1", ...).
  const std::vector<std::string>& class_names() const { return names_; }
  // The test accuracy recorded at export (attribute test_accuracy), or -1.
  double recorded_accuracy() const { return recorded_accuracy_; }

  // The predicted class (int64 [N]) of each uint8 image [N, C, H, W] of the
  // classifier's shape, in batches of `batch`.
  absl::StatusOr<at::Tensor> Classify(const at::Tensor& images,
                                      int64_t batch = 500);

 private:
  explicit ImageClassifier(torch::jit::Module module)
      : module_(std::move(module)) {}
  absl::Status Check();
  // OK for uint8 images [N, C, H, W] of the classifier's shape.
  absl::Status CheckImages(const at::Tensor& images) const;

  torch::jit::Module module_;
  int num_classes_ = 0;
  ImageShape shape_;
  std::vector<std::string> names_;
  double recorded_accuracy_ = -1;
};

struct GuidedCheckOptions {
  int64_t per_class = 100;  // samples per class
  SamplerConfig sampler;    // default: deterministic DDIM, 50 steps
  double guidance = 3.0;    // classifier-free guidance scale (1 = plain)
  uint64_t seed = 0;        // class c, chunk j samples with seed + 1000 c + j
  int64_t batch = 100;      // images per sampling call (2 rows each, guided)
  // Called after each sampling call with (class, images done in the class).
  std::function<void(int, int64_t)> progress;
};

struct GuidedCheckResult {
  // confusion[c][k]: samples asked for class c that were classified as k.
  std::vector<std::vector<int64_t>> confusion;
  int64_t per_class = 0;
  // The fraction of class c's samples classified as c.
  double Fraction(int c) const;
  // The fraction over all samples.
  double Overall() const;
};

// Samples options.per_class images of each class of `generator` (which must
// be class-conditional with the classifier's classes and shape) and
// classifies them.
absl::StatusOr<GuidedCheckResult> CheckGuidedSamples(
    Denoiser& generator, ImageClassifier& classifier,
    const GuidedCheckOptions& options);

}  // namespace vdm

#endif  // VDM_TOOLS_CLASSIFIER_H_
