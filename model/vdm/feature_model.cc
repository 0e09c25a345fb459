#include "model/vdm/feature_model.h"

#include <torch/script.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {

struct FeatureModel::Impl {
  mutable absl::Mutex mu;
  mutable torch::jit::Module module;
};

namespace {

std::string TorchMessage(const std::exception& e) {
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  return c10 ? c10->what_without_backtrace() : e.what();
}

absl::StatusOr<int> IntAttribute(const torch::jit::Module& m,
                                 const std::string& name) {
  if (!m.hasattr(name) || !m.attr(name).isInt()) {
    return absl::InvalidArgumentError(
        absl::StrCat("missing int attribute '", name, "'"));
  }
  return static_cast<int>(m.attr(name).toInt());
}

}  // namespace

FeatureModel::FeatureModel(std::unique_ptr<Impl> impl)
    : impl_(std::move(impl)) {}
FeatureModel::~FeatureModel() = default;

absl::StatusOr<std::unique_ptr<FeatureModel>> FeatureModel::Load(
    const std::string& path) {
  auto impl = std::make_unique<Impl>();
  try {
    impl->module = torch::jit::load(path, at::kCPU);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature model ", path, ": cannot load: ", TorchMessage(e)));
  }
  impl->module.eval();
  const auto fail = [&path](const absl::Status& s) {
    return absl::Status(s.code(),
                        absl::StrCat("feature model ", path, ": ", s.message()));
  };
  if (!impl->module.find_method("features")) {
    return fail(absl::InvalidArgumentError(
        "no features(f) method (export it with model/net/classifier.py)"));
  }
  std::unique_ptr<FeatureModel> model(new FeatureModel(std::move(impl)));
  model->path_ = path;
  for (auto [field, name] :
       {std::pair{&model->shape_.channels, "image_channels"},
        std::pair{&model->shape_.height, "image_height"},
        std::pair{&model->shape_.width, "image_width"}}) {
    absl::StatusOr<int> v = IntAttribute(model->impl_->module, name);
    if (!v.ok()) return fail(v.status());
    if (*v < 1) return fail(absl::InvalidArgumentError(absl::StrCat(name, " < 1")));
    *field = *v;
  }
  const ImageShape& s = model->shape_;
  absl::StatusOr<at::Tensor> probe =
      model->Features(at::zeros({2, s.channels, s.height, s.width}, at::kByte));
  if (!probe.ok()) return fail(probe.status());
  model->dimension_ = probe->size(1);
  if (model->dimension_ < 1) {
    return fail(absl::InvalidArgumentError("features(f) returned no features"));
  }
  if (model->impl_->module.find_method("local_features")) {
    model->has_local_features_ = true;
    absl::StatusOr<at::Tensor> local = model->LocalFeatures(
        at::zeros({2, s.channels, s.height, s.width}, at::kByte));
    if (!local.ok()) return fail(local.status());
    if (local->size(1) < 1 || local->size(2) < 1 || local->size(3) < 1) {
      return fail(absl::InvalidArgumentError(
          "local_features(f) must return [N, C, h, w] with C, h, w >= 1"));
    }
  }
  return model;
}

absl::StatusOr<at::Tensor> FeatureModel::Run(const char* method,
                                             const at::Tensor& images,
                                             int64_t batch, int64_t dims) const {
  if (!images.defined() || images.dim() != 4 ||
      images.size(1) != shape_.channels || images.size(2) != shape_.height ||
      images.size(3) != shape_.width || images.is_floating_point()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature model: images must be integer [N,", shape_.channels, ",",
        shape_.height, ",", shape_.width, "], got [",
        images.defined() ? absl::StrJoin(images.sizes(), ",") : "", "]"));
  }
  batch = std::max<int64_t>(1, batch);
  std::vector<at::Tensor> out;
  absl::MutexLock lock(&impl_->mu);
  try {
    torch::NoGradGuard no_grad;
    torch::jit::Method run = impl_->module.get_method(method);
    for (int64_t i = 0; i < images.size(0); i += batch) {
      const int64_t n = std::min(batch, images.size(0) - i);
      const at::Tensor f = ToModelSpace(images.narrow(0, i, n).to(at::kCPU));
      const c10::IValue h = run({f});
      if (!h.isTensor() || h.toTensor().dim() != dims ||
          h.toTensor().size(0) != n ||
          (!out.empty() && h.toTensor().sizes().slice(1) != out[0].sizes().slice(1))) {
        return absl::InvalidArgumentError(absl::StrCat(
            "feature model: ", method, "(f) must return a ", dims,
            "-d tensor with a row per image, the same shape for every batch"));
      }
      out.push_back(h.toTensor().to(at::kFloat).contiguous());
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature model: ", method, "(f) failed: ", TorchMessage(e)));
  }
  if (out.empty()) return at::empty({0}, at::kFloat);
  return at::cat(out);
}

absl::StatusOr<at::Tensor> FeatureModel::Features(const at::Tensor& images,
                                                  int64_t batch) const {
  VDM_ASSIGN_OR_RETURN(at::Tensor h, Run("features", images, batch, 2));
  if (dimension_ > 0 && h.size(0) > 0 && h.size(1) != dimension_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "feature model: features(f) must return [N, ", dimension_, "]"));
  }
  if (h.size(0) == 0) return at::empty({0, dimension_}, at::kFloat);
  return h;
}

absl::StatusOr<at::Tensor> FeatureModel::LocalFeatures(const at::Tensor& images,
                                                       int64_t batch) const {
  if (!has_local_features_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "feature model ", path_, ": no local_features(f) method (re-export it "
        "with model/net/classifier.py --reexport)"));
  }
  return Run("local_features", images, batch, 4);
}

}  // namespace vdm
