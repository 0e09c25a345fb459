#include "model/vdm/torchscript_model.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>

#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// TorchScript raises c10::Error from ops and torch::jit::JITException (a
// std::runtime_error) from `raise` in scripted code; both end here.
absl::Status FromTorch(const std::exception& e, absl::string_view what) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  return absl::InternalError(absl::StrCat(
      what, ": ", c10_error ? c10_error->what_without_backtrace() : e.what()));
}

// Reads an int attribute, naming it when it is missing or of the wrong type.
absl::StatusOr<int64_t> IntAttr(const torch::jit::Module& m,
                                const std::string& name) {
  if (!m.hasattr(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model contract: missing int attribute '", name, "'"));
  }
  const c10::IValue v = m.attr(name);
  if (!v.isInt()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model contract: attribute '", name, "' must be int, is ",
        v.tagKind()));
  }
  return v.toInt();
}

absl::StatusOr<std::string> StrAttr(const torch::jit::Module& m,
                                    const std::string& name) {
  if (!m.hasattr(name)) {
    return absl::InvalidArgumentError(
        absl::StrCat("model contract: missing str attribute '", name, "'"));
  }
  const c10::IValue v = m.attr(name);
  if (!v.isString()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model contract: attribute '", name, "' must be str, is ",
        v.tagKind()));
  }
  return v.toStringRef();
}

absl::StatusOr<torch::Device> ParseDevice(const std::string& spec) {
  try {
    torch::Device device(spec);
    if (device.is_cuda() && !at::hasCUDA()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "device '", spec, "': this build of libtorch has no CUDA device"));
    }
    return device;
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", spec, "' is not a valid torch device"));
  }
}

}  // namespace

void SetTorchThreads(int n) {
  if (n <= 0) n = static_cast<int>(std::thread::hardware_concurrency());
  if (n <= 0) n = 1;
  at::set_num_threads(n);
}

absl::StatusOr<std::unique_ptr<TorchScriptModel>> TorchScriptModel::Load(
    const Options& options) {
  VDM_ASSIGN_OR_RETURN(torch::Device device, ParseDevice(options.device));
  torch::jit::Module module;
  try {
    module = torch::jit::load(options.path, device);
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot load TorchScript model '", options.path,
                     "': ", FromTorch(e, "torch::jit::load").message()));
  }
  return FromModule(std::move(module), options);
}

absl::StatusOr<std::unique_ptr<TorchScriptModel>> TorchScriptModel::FromModule(
    torch::jit::Module module, const Options& options) {
  VDM_ASSIGN_OR_RETURN(torch::Device device, ParseDevice(options.device));
  std::unique_ptr<TorchScriptModel> model(
      new TorchScriptModel(std::move(module), options, device));
  absl::Status status = model->CheckContract();
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat(options.path, ": ",
                                                    status.message()));
  }
  return model;
}

absl::Status TorchScriptModel::CheckContract() {
  VDM_ASSIGN_OR_RETURN(int64_t c, IntAttr(module_, "image_channels"));
  VDM_ASSIGN_OR_RETURN(int64_t h, IntAttr(module_, "image_height"));
  VDM_ASSIGN_OR_RETURN(int64_t w, IntAttr(module_, "image_width"));
  VDM_ASSIGN_OR_RETURN(int64_t n, IntAttr(module_, "num_classes"));
  VDM_ASSIGN_OR_RETURN(prediction_, StrAttr(module_, "prediction"));
  VDM_ASSIGN_OR_RETURN(metadata_, StrAttr(module_, "metadata"));
  if (c <= 0 || h <= 0 || w <= 0 || c > 4 || h > 4096 || w > 4096) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "model contract: image shape %dx%dx%d out of range", c, h, w));
  }
  if (n < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model contract: num_classes must be >= 0, is ", n));
  }
  if (prediction_ != "eps" && prediction_ != "v" && prediction_ != "x") {
    return absl::InvalidArgumentError(
        absl::StrCat("model contract: prediction must be \"eps\", \"v\" or "
                     "\"x\", is \"", prediction_, "\""));
  }
  shape_ = ImageShape{static_cast<int>(c), static_cast<int>(h),
                      static_cast<int>(w)};
  num_classes_ = static_cast<int>(n);
  if (!module_.find_method("forward")) {
    return absl::InvalidArgumentError("model contract: missing method forward");
  }
  if (!module_.find_method("gamma")) {
    return absl::InvalidArgumentError(
        "model contract: missing method gamma(t)");
  }
  module_.eval();
  if (!options_.check_forward) return absl::OkStatus();
  return CheckForward();
}

absl::Status TorchScriptModel::CheckForward() {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device_);
  torch::NoGradGuard no_grad;
  const at::Tensor t = torch::tensor({0.0f, 1.0f}, f32);
  absl::StatusOr<GammaValues> g = Gamma(t);
  if (!g.ok()) return g.status();
  if (!(g->gamma[1].item<float>() > g->gamma[0].item<float>())) {
    return absl::InvalidArgumentError(
        "model contract: gamma(t) must increase from t=0 to t=1");
  }
  const at::Tensor z =
      torch::randn({2, shape_.channels, shape_.height, shape_.width}, f32);
  const at::Tensor label =
      torch::full({2}, num_classes_, f32.dtype(torch::kLong));
  VDM_ASSIGN_OR_RETURN(at::Tensor eps, Denoise(z, g->gamma, label));
  if (eps.sizes() != z.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model contract: forward(z, gamma, label) must return z's shape [",
        absl::StrJoin(z.sizes(), ","), "], returned [",
        absl::StrJoin(eps.sizes(), ","), "]"));
  }
  if (!torch::isfinite(eps).all().item<bool>()) {
    return absl::InvalidArgumentError(
        "model contract: forward returned non-finite values");
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> TorchScriptModel::Denoise(const at::Tensor& z,
                                                     const at::Tensor& gamma,
                                                     const at::Tensor& label) {
  try {
    // One transfer each way per batch (no-ops when z is on the device).
    const at::Tensor zd = z.to(device_), gd = gamma.to(device_);
    c10::IValue out = module_.forward({zd, gd, label.to(device_)});
    if (!out.isTensor()) {
      return absl::InvalidArgumentError(
          "model contract: forward must return a Tensor");
    }
    at::Tensor output = out.toTensor();
    if (output.sizes() != z.sizes()) return output;  // CheckForward reports.
    return ToEps(prediction_, output.to(torch::kFloat), zd, gd).to(z.device());
  } catch (const std::exception& e) {
    return FromTorch(e, "model forward failed");
  }
}

absl::StatusOr<EpsVjp> TorchScriptModel::DenoiseVjp(const at::Tensor& z,
                                                    const at::Tensor& gamma,
                                                    const at::Tensor& label,
                                                    const at::Tensor& v) {
  if (v.sizes() != z.sizes()) {
    return absl::InvalidArgumentError("DenoiseVjp: v must have z's shape");
  }
  try {
    torch::AutoGradMode grad_mode(true);
    const at::Tensor zd =
        z.detach().to(device_, torch::kFloat).requires_grad_(true);
    const at::Tensor gd = gamma.to(device_);
    c10::IValue out = module_.forward({zd, gd, label.to(device_)});
    if (!out.isTensor()) {
      return absl::InvalidArgumentError(
          "model contract: forward must return a Tensor");
    }
    const at::Tensor output = out.toTensor();
    if (output.sizes() != z.sizes()) {
      return absl::InvalidArgumentError(
          "model contract: forward(z, gamma, label) must return z's shape");
    }
    const at::Tensor eps = ToEps(prediction_, output.to(torch::kFloat), zd, gd);
    std::vector<at::Tensor> grads = torch::autograd::grad(
        {eps}, {zd}, {v.to(device_, torch::kFloat)}, /*retain_graph=*/false,
        /*create_graph=*/false, /*allow_unused=*/true);
    at::Tensor vjp = grads.empty() || !grads[0].defined()
                         ? at::zeros_like(zd)  // eps does not depend on z
                         : grads[0];
    return EpsVjp{eps.detach().to(z.device()), vjp.detach().to(z.device())};
  } catch (const std::exception& e) {
    return FromTorch(e, "model forward/backward failed");
  }
}

absl::StatusOr<GammaValues> TorchScriptModel::Gamma(const at::Tensor& t) {
  VDM_ASSIGN_OR_RETURN(GammaValues g,
                       GammaWithDerivative(module_, t, device_, false));
  return GammaValues{g.gamma.to(t.device()), g.dgamma_dt.to(t.device())};
}

absl::StatusOr<GammaValues> GammaWithDerivative(torch::jit::Module& module,
                                                const at::Tensor& t,
                                                const torch::Device& device,
                                                bool create_graph) {
  try {
    torch::AutoGradMode grad_mode(true);
    at::Tensor tt = t.detach().to(device, torch::kFloat).requires_grad_(true);
    at::Tensor gamma = module.run_method("gamma", tt).toTensor();
    if (gamma.sizes() != tt.sizes()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "model contract: gamma(t) must return t's shape [",
          absl::StrJoin(tt.sizes(), ","), "], returned [",
          absl::StrJoin(gamma.sizes(), ","), "]"));
    }
    std::vector<at::Tensor> grads;
    if (gamma.requires_grad()) {
      grads = torch::autograd::grad({gamma}, {tt}, {torch::ones_like(gamma)},
                                    /*retain_graph=*/create_graph,
                                    create_graph, /*allow_unused=*/true);
    }
    if (grads.empty() || !grads[0].defined()) {
      return absl::InvalidArgumentError(
          "model contract: gamma(t) does not depend on t (autograd gives no "
          "derivative, so the diffusion term would read as 0)");
    }
    if (create_graph) return GammaValues{gamma, grads[0]};
    return GammaValues{gamma.detach(), grads[0].detach()};
  } catch (const std::exception& e) {
    return FromTorch(e, "model gamma(t) failed");
  }
}

}  // namespace vdm
