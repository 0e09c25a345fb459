#include "model/vdm/torchscript_model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/script.h>
#ifdef VDM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

#include <algorithm>
#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "model/vdm/autocast.h"
#include "model/vdm/fused_norm_silu.h"
#include "model/vdm/cpus.h"
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

bool HasNativeBf16(const std::string& device) {
  if (device != "cpu") {
    // A CUDA device: only a CUDA build can ask (VDM_CUDA, see CMakeLists.txt);
    // Ampere (8.x) and later compute bf16 natively.
#ifdef VDM_WITH_CUDA
    return at::hasCUDA() && at::cuda::getDeviceProperties(
                                torch::Device(device).index())->major >= 8;
#else
    return false;
#endif
  }
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    return line.find(" avx512_bf16") != std::string::npos ||
           line.find(" amx_bf16") != std::string::npos;
  }
  return false;
}

absl::StatusOr<Precision> ResolvePrecision(const std::string& spec,
                                           const std::string& device,
                                           const std::string& flag) {
  if (spec == "fp32") return Precision::kFp32;
  if (spec == "bf16") return Precision::kBf16;
  if (spec == "auto") {
    return HasNativeBf16(device) ? Precision::kBf16 : Precision::kFp32;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "--", flag, ": \"", spec, "\" is not fp32, bf16 or auto"));
}

PrecisionTrial ChoosePrecision(
    bool native_bf16, int rows,
    const std::function<absl::StatusOr<double>(Precision)>& seconds,
    double min_speedup) {
  PrecisionTrial trial;
  if (!native_bf16) {
    trial.reason = "fp32: the device has no native bf16 (not measured)";
    return trial;
  }
  double best[2] = {0, 0};  // fastest seconds: fp32, bf16
  for (int round = 0; round < 4; ++round) {  // round 0 warms up
    for (Precision p : {Precision::kFp32, Precision::kBf16}) {
      absl::StatusOr<double> s = seconds(p);
      if (!s.ok() || !(*s > 0)) {
        trial.reason = absl::StrCat(
            "fp32: a timing pass in ", PrecisionName(p), " failed: ",
            s.ok() ? "no time measured" : std::string(s.status().message()));
        return trial;
      }
      double& b = best[p == Precision::kBf16];
      if (round > 0 && (b == 0 || *s < b)) b = *s;
    }
  }
  trial.fp32_rows_per_second = rows / best[0];
  trial.bf16_rows_per_second = rows / best[1];
  const double speedup = trial.bf16_rows_per_second / trial.fp32_rows_per_second;
  const bool faster = speedup >= min_speedup;
  trial.chosen = faster ? Precision::kBf16 : Precision::kFp32;
  trial.reason = absl::StrFormat(
      "%s: bf16 measured %.2fx fp32 (%.0f vs %.0f rows/s at %d rows; bf16 "
      "needs >= %.2fx)",
      faster ? "bf16" : "fp32", speedup, trial.bf16_rows_per_second,
      trial.fp32_rows_per_second, rows, min_speedup);
  return trial;
}

void SetTorchThreads(int n) {
  if (n <= 0) n = AvailableCpus().cpus;
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
  int fused = 0;
  if (options.fuse_norm_silu) {
    try {
      fused = FuseGroupNormSilu(module);
    } catch (const std::exception& e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot fuse group norm + SiLU in '", options.path,
          "' (--fuse_norm_silu=false serves it unfused): ",
          FromTorch(e, "FuseGroupNormSilu").message()));
    }
  }
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<TorchScriptModel> model,
                       FromModule(std::move(module), options));
  model->fused_norm_silu_ = fused;
  return model;
}

absl::StatusOr<std::unique_ptr<TorchScriptModel>> TorchScriptModel::FromModule(
    torch::jit::Module module, const Options& options) {
  VDM_ASSIGN_OR_RETURN(torch::Device device, ParseDevice(options.device));
  VDM_ASSIGN_OR_RETURN(const Precision precision,
                       ResolvePrecision(options.precision, options.device));
  std::unique_ptr<TorchScriptModel> model(
      new TorchScriptModel(std::move(module), options, device));
  // auto: the contract is checked in bf16 (and fp32) where bf16 is a
  // candidate, then the two are timed.
  model->precision_ = precision;
  absl::Status status = model->CheckContract();
  if (!status.ok() && options.precision == "auto" &&
      precision == Precision::kBf16) {
    // The flags promise bf16 but its forward pass fails (e.g. a oneDNN
    // without bf16 kernels for this ISA): auto serves fp32 instead.
    model->precision_ = Precision::kFp32;
    const std::string bf16_error(status.message());
    status = model->CheckContract();
    if (status.ok()) {
      PrecisionTrial trial;
      trial.reason = absl::StrCat("fp32: bf16 failed the contract check: ",
                                  bf16_error.substr(0, bf16_error.find('\n')));
      model->trial_ = trial;
      return model;
    }
  }
  if (!status.ok()) {
    return absl::Status(status.code(), absl::StrCat(options.path, ": ",
                                                    status.message()));
  }
  if (options.precision == "auto") model->MeasurePrecision();
  return model;
}

void TorchScriptModel::MeasurePrecision() {
  const int rows = std::max(1, options_.timing_rows);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(0);
  const at::Tensor z = at::randn(
      {rows, shape_.channels, shape_.height, shape_.width}, gen, at::kFloat);
  const at::Tensor gamma = at::linspace(-10.0, 4.0, rows, at::kFloat);
  const at::Tensor label = at::full({rows}, num_classes_, at::kLong);
  auto seconds = [&](Precision p) -> absl::StatusOr<double> {
    torch::NoGradGuard no_grad;
    const absl::Time start = absl::Now();
    VDM_ASSIGN_OR_RETURN(at::Tensor out, Forward(z, gamma, label, p));
    out = out.to(at::kCPU);  // waits for a CUDA device
    return absl::ToDoubleSeconds(absl::Now() - start);
  };
  trial_ = ChoosePrecision(precision_ == Precision::kBf16, rows, seconds);
  precision_ = trial_->chosen;
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
  VDM_RETURN_IF_ERROR(CheckForward(precision_));
  if (precision_ != Precision::kFp32) {
    VDM_RETURN_IF_ERROR(CheckForward(Precision::kFp32));
  }
  return absl::OkStatus();
}

absl::Status TorchScriptModel::CheckForward(Precision precision) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device_);
  torch::NoGradGuard no_grad;
  VDM_RETURN_IF_ERROR(CheckGammaMonotone(module_, device_));
  const at::Tensor t = torch::tensor({0.0f, 1.0f}, f32);
  absl::StatusOr<GammaValues> g = Gamma(t);
  if (!g.ok()) return g.status();
  const at::Tensor z =
      torch::randn({2, shape_.channels, shape_.height, shape_.width}, f32);
  const at::Tensor label =
      torch::full({2}, num_classes_, f32.dtype(torch::kLong));
  VDM_ASSIGN_OR_RETURN(at::Tensor eps, Forward(z, g->gamma, label, precision));
  if (eps.sizes() != z.sizes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model contract: forward(z, gamma, label) must return z's shape [",
        absl::StrJoin(z.sizes(), ","), "], returned [",
        absl::StrJoin(eps.sizes(), ","), "]"));
  }
  if (!torch::isfinite(eps).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model contract: forward returned non-finite values (in ",
        PrecisionName(precision), ")"));
  }
  return absl::OkStatus();
}

absl::StatusOr<at::Tensor> TorchScriptModel::Denoise(const at::Tensor& z,
                                                     const at::Tensor& gamma,
                                                     const at::Tensor& label) {
  return Forward(z, gamma, label, precision_);
}

absl::StatusOr<at::Tensor> TorchScriptModel::DenoiseFp32(
    const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& label) {
  return Forward(z, gamma, label, Precision::kFp32);
}

absl::StatusOr<at::Tensor> TorchScriptModel::Forward(const at::Tensor& z,
                                                     const at::Tensor& gamma,
                                                     const at::Tensor& label,
                                                     Precision precision) {
  try {
    // One transfer each way per batch (no-ops when the rows already are on
    // the device in the contract's dtypes).
    const at::Tensor zd = z.to(device_, at::kFloat);
    const at::Tensor gd = gamma.to(device_, at::kFloat);
    const at::Tensor ld = label.to(device_, at::kLong);
    c10::IValue out;
    {
      Bf16Autocast autocast(precision == Precision::kBf16, device_.type());
      out = module_.forward({zd, gd, ld});
    }
    if (!out.isTensor()) {
      return absl::InvalidArgumentError(
          "model contract: forward must return a Tensor");
    }
    at::Tensor output = out.toTensor();
    if (output.sizes() != z.sizes()) return output;  // CheckForward reports.
    return ToEps(prediction_, output.to(at::kFloat), zd, gd).to(z.device());
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

absl::Status CheckGammaMonotone(torch::jit::Module& module,
                                const torch::Device& device, int points) {
  const at::Tensor t = at::linspace(0.0, 1.0, std::max(points, 2),
                                    at::TensorOptions().dtype(at::kFloat));
  VDM_ASSIGN_OR_RETURN(GammaValues g, GammaWithDerivative(module, t, device,
                                                          false));
  const at::Tensor gamma = g.gamma.to(at::kCPU).to(at::kDouble);
  const at::Tensor dgamma = g.dgamma_dt.to(at::kCPU).to(at::kDouble);
  if (!at::isfinite(gamma).all().item<bool>() ||
      !at::isfinite(dgamma).all().item<bool>()) {
    return absl::InvalidArgumentError(
        "model contract: gamma(t) or its derivative is not finite on [0, 1]");
  }
  const int64_t n = t.size(0);
  if (!(gamma[n - 1].item<double>() > gamma[0].item<double>())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "model contract: gamma(t) must increase from t=0 to t=1 (gamma(0) = "
        "%.6g, gamma(1) = %.6g)",
        gamma[0].item<double>(), gamma[n - 1].item<double>()));
  }
  for (int64_t i = 0; i < n; ++i) {
    const double ti = t[i].item<double>();
    if (!(dgamma[i].item<double>() > 0)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "model contract: d gamma/dt by autograd must be positive on [0, 1], "
          "is %.6g at t = %.4f (checked on %d points)",
          dgamma[i].item<double>(), ti, n));
    }
    if (i + 1 < n && !(gamma[i + 1].item<double>() > gamma[i].item<double>())) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "model contract: gamma(t) must increase on [0, 1]: gamma(%.4f) = "
          "%.6g but gamma(%.4f) = %.6g (checked on %d points)",
          ti, gamma[i].item<double>(), t[i + 1].item<double>(),
          gamma[i + 1].item<double>(), n));
    }
  }
  return absl::OkStatus();
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
