#include "tools/classifier.h"

#include <torch/torch.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/samplers.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

absl::Status TorchError(const std::string& what, const std::exception& e) {
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  return absl::InvalidArgumentError(
      absl::StrCat(what, ": ", c10 ? c10->what_without_backtrace() : e.what()));
}

absl::StatusOr<int> IntAttribute(const torch::jit::Module& m,
                                 const std::string& name) {
  if (!m.hasattr(name) || !m.attr(name).isInt()) {
    return absl::InvalidArgumentError(
        absl::StrCat("classifier: missing int attribute '", name, "'"));
  }
  return static_cast<int>(m.attr(name).toInt());
}

}  // namespace

absl::StatusOr<std::unique_ptr<ImageClassifier>> ImageClassifier::Load(
    const std::string& path) {
  torch::jit::Module module;
  try {
    module = torch::jit::load(path);
  } catch (const std::exception& e) {
    return TorchError(absl::StrCat("cannot load classifier ", path), e);
  }
  module.eval();
  std::unique_ptr<ImageClassifier> c(new ImageClassifier(std::move(module)));
  absl::Status status = c->Check();
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat(path, ": ", status.message()));
  }
  return c;
}

absl::Status ImageClassifier::Check() {
  VDM_ASSIGN_OR_RETURN(num_classes_, IntAttribute(module_, "num_classes"));
  VDM_ASSIGN_OR_RETURN(shape_.channels,
                       IntAttribute(module_, "image_channels"));
  VDM_ASSIGN_OR_RETURN(shape_.height, IntAttribute(module_, "image_height"));
  VDM_ASSIGN_OR_RETURN(shape_.width, IntAttribute(module_, "image_width"));
  if (num_classes_ < 2 || shape_.channels < 1 || shape_.height < 1 ||
      shape_.width < 1) {
    return absl::InvalidArgumentError(
        "classifier: num_classes must be >= 2 and the image shape positive");
  }
  if (module_.hasattr("test_accuracy") &&
      module_.attr("test_accuracy").isDouble()) {
    recorded_accuracy_ = module_.attr("test_accuracy").toDouble();
  }
  for (int c = 0; c < num_classes_; ++c) names_.push_back(absl::StrCat(c));
  if (module_.hasattr("metadata") && module_.attr("metadata").isString()) {
    nlohmann::json meta =
        nlohmann::json::parse(module_.attr("metadata").toStringRef(), nullptr,
                              /*allow_exceptions=*/false);
    if (meta.is_object() && meta.contains("classes") &&
        meta["classes"].is_array() &&
        meta["classes"].size() == static_cast<size_t>(num_classes_)) {
      for (int c = 0; c < num_classes_; ++c) {
        if (meta["classes"][c].is_string()) names_[c] = meta["classes"][c];
      }
    }
  }
  // One forward at batch 2.
  at::Tensor probe =
      at::zeros({2, shape_.channels, shape_.height, shape_.width}, at::kByte);
  VDM_ASSIGN_OR_RETURN(at::Tensor labels, Classify(probe));
  (void)labels;
  return absl::OkStatus();
}

absl::Status ImageClassifier::CheckImages(const at::Tensor& images) const {
  if (images.dim() != 4 || images.size(1) != shape_.channels ||
      images.size(2) != shape_.height || images.size(3) != shape_.width) {
    return absl::InvalidArgumentError(
        absl::StrCat("classifier: images must be [N,", shape_.channels, ",",
                     shape_.height, ",", shape_.width, "], got [",
                     absl::StrJoin(images.sizes(), ","), "]"));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> ImageClassifier::Classify(const at::Tensor& images,
                                                     int64_t batch) {
  VDM_RETURN_IF_ERROR(CheckImages(images));
  batch = std::max<int64_t>(1, batch);
  torch::NoGradGuard no_grad;
  std::vector<at::Tensor> out;
  try {
    for (int64_t i = 0; i < images.size(0); i += batch) {
      const int64_t n = std::min(batch, images.size(0) - i);
      at::Tensor f = ToModelSpace(images.narrow(0, i, n).cpu());
      c10::IValue logits = module_.forward({f});
      if (!logits.isTensor() || logits.toTensor().dim() != 2 ||
          logits.toTensor().size(0) != n ||
          logits.toTensor().size(1) != num_classes_) {
        return absl::InvalidArgumentError(
            absl::StrCat("classifier: forward(f) must return logits [", n, ",",
                         num_classes_, "]"));
      }
      out.push_back(logits.toTensor().argmax(1));
    }
  } catch (const std::exception& e) {
    return TorchError("classifier: forward(f [B,C,H,W] float32) failed", e);
  }
  if (out.empty()) return at::empty({0}, at::kLong);
  return at::cat(out);
}

double GuidedCheckResult::Fraction(int c) const {
  if (per_class <= 0) return 0;
  return static_cast<double>(confusion[c][c]) / per_class;
}

double GuidedCheckResult::Overall() const {
  if (confusion.empty() || per_class <= 0) return 0;
  int64_t right = 0;
  for (size_t c = 0; c < confusion.size(); ++c) right += confusion[c][c];
  return static_cast<double>(right) / (per_class * confusion.size());
}

absl::StatusOr<GuidedCheckResult> CheckGuidedSamples(
    Denoiser& generator, ImageClassifier& classifier,
    const GuidedCheckOptions& options) {
  const int k = classifier.num_classes();
  const ImageShape g = generator.shape(), c = classifier.shape();
  if (generator.num_classes() != k) {
    return absl::InvalidArgumentError(
        absl::StrCat("the generator has ", generator.num_classes(),
                     " classes (0 = unconditional), the classifier ", k));
  }
  if (g.channels != c.channels || g.height != c.height || g.width != c.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the generator's images are ", g.channels, "x", g.height, "x", g.width,
        ", the classifier's ", c.channels, "x", c.height, "x", c.width));
  }
  if (options.per_class < 1) {
    return absl::InvalidArgumentError("per_class must be >= 1");
  }
  torch::NoGradGuard no_grad;
  GuidedCheckResult result;
  result.per_class = options.per_class;
  result.confusion.assign(k, std::vector<int64_t>(k, 0));
  const int64_t batch = std::max<int64_t>(1, options.batch);
  for (int cls = 0; cls < k; ++cls) {
    for (int64_t done = 0, chunk = 0; done < options.per_class; ++chunk) {
      SampleOptions s;
      s.sampler = options.sampler;
      s.num_images = std::min(batch, options.per_class - done);
      s.conditioning.label = cls;
      s.conditioning.guidance_scale = options.guidance;
      s.seed = options.seed + 1000 * static_cast<uint64_t>(cls) + chunk;
      VDM_ASSIGN_OR_RETURN(at::Tensor images, SampleImages(generator, s));
      VDM_ASSIGN_OR_RETURN(at::Tensor predicted, classifier.Classify(images));
      auto p = predicted.accessor<int64_t, 1>();
      for (int64_t i = 0; i < p.size(0); ++i) ++result.confusion[cls][p[i]];
      done += s.num_images;
      if (options.progress) options.progress(cls, done);
    }
  }
  return result;
}

}  // namespace vdm
