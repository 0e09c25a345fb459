#include "model/train/preview.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

at::Tensor Gamma(torch::jit::Module& module, double t, int64_t n,
                 const torch::Device& device) {
  at::Tensor tt = at::full({n}, t, at::kFloat).to(device);
  return module.run_method("gamma", tt).toTensor();
}

// eps_hat for z at gamma (per row), guided when the model has classes.
at::Tensor GuidedEps(torch::jit::Module& module, const ModelInfo& info,
                     const at::Tensor& z, const at::Tensor& gamma,
                     const at::Tensor& labels, double guidance) {
  const int64_t n = z.size(0);
  if (info.num_classes == 0 || guidance == 1.0) {
    at::Tensor out = module.forward({z, gamma, labels}).toTensor();
    return ToEps(info.prediction, out, z, gamma);
  }
  at::Tensor none = at::full_like(labels, info.num_classes);
  at::Tensor zz = at::cat({z, z}), gg = at::cat({gamma, gamma});
  at::Tensor out =
      module.forward({zz, gg, at::cat({labels, none})}).toTensor();
  at::Tensor eps = ToEps(info.prediction, out, zz, gg);
  return Guide(eps.slice(0, n), eps.slice(0, 0, n),
               at::full({n}, guidance, eps.options()));
}

}  // namespace

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> SampleGuided(
    torch::jit::Module& module, const ModelInfo& info,
    const SampleGridOptions& o) {
  if (o.per_class < 1 || o.steps < 1) {
    return absl::InvalidArgumentError("per_class and steps must be >= 1");
  }
  const int rows = std::max(1, info.num_classes);
  const int64_t n = static_cast<int64_t>(rows) * o.per_class;
  try {
    torch::NoGradGuard no_grad;
    at::Generator gen = at::detail::createCPUGenerator(o.seed);
    const ImageShape& s = info.shape;
    at::Tensor z = at::randn({n, s.channels, s.height, s.width}, gen,
                             at::TensorOptions(at::kFloat))
                       .to(info.device);
    at::Tensor labels =
        info.num_classes > 0
            ? at::arange(rows, at::kLong).repeat_interleave(o.per_class)
            : at::zeros({n}, at::kLong);
    labels = labels.to(info.device);
    at::Tensor eta = at::zeros({1}, z.options());
    at::Tensor xi = at::zeros_like(z);
    for (int i = o.steps; i >= 1; --i) {
      if (o.stop != nullptr && o.stop->load()) {
        return absl::CancelledError("sampling interrupted");
      }
      at::Tensor g_t = Gamma(module, static_cast<double>(i) / o.steps, n,
                             info.device);
      at::Tensor g_s = Gamma(module, static_cast<double>(i - 1) / o.steps, n,
                             info.device);
      at::Tensor eps = GuidedEps(module, info, z, g_t, labels, o.guidance);
      z = DdimStep(z, eps, g_t, g_s, eta, xi);
    }
    at::Tensor images = DecodeMostLikely(z, Gamma(module, 0.0, n, info.device));
    if (info.num_classes == 0) labels.fill_(0);
    return std::make_pair(images.cpu(), labels.cpu());
  } catch (const c10::Error& e) {
    return absl::InternalError(
        absl::StrCat("sampling: ", e.what_without_backtrace()));
  }
}

absl::StatusOr<Image8> SampleGrid(torch::jit::Module& module,
                                  const ModelInfo& info,
                                  const SampleGridOptions& o) {
  VDM_ASSIGN_OR_RETURN(auto samples, SampleGuided(module, info, o));
  const at::Tensor images = samples.first.contiguous();
  const ImageShape& s = info.shape;
  std::vector<Image8> tiles(images.size(0));
  const uint8_t* data = images.data_ptr<uint8_t>();
  for (size_t i = 0; i < tiles.size(); ++i) {
    tiles[i].channels = s.channels;
    tiles[i].height = s.height;
    tiles[i].width = s.width;
    tiles[i].pixels.assign(data + i * s.dims(), data + (i + 1) * s.dims());
  }
  return MakeGrid(tiles, o.per_class);
}

}  // namespace vdm
