// Loads a TorchScript VDM (.pt) and checks the model contract
// (docs/design.md, "Model contract"); serves it as a Denoiser.
// Thread-compatible (one caller at a time).
#ifndef VDM_MODEL_VDM_TORCHSCRIPT_MODEL_H_
#define VDM_MODEL_VDM_TORCHSCRIPT_MODEL_H_

#include <torch/script.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

// What --precision=auto measured on a replica, and what it chose.
struct PrecisionTrial {
  Precision chosen = Precision::kFp32;
  double fp32_rows_per_second = 0;  // 0 = not measured
  double bf16_rows_per_second = 0;
  std::string reason;  // one line, for the log and GetModelInfo
};

// bf16 must be at least this much faster than fp32 for auto to choose it.
inline constexpr double kBf16MinSpeedup = 1.15;

// The choice of --precision=auto: fp32 unless the device computes bf16
// natively and bf16 measures at least `min_speedup` x fp32's rows/s.
// `seconds(p)` runs one forward pass of `rows` rows in precision p and
// returns how long it took (injected in tests). One warm-up pass each, then
// three alternated rounds; each precision's fastest round counts. A failed
// pass chooses fp32 and says why.
PrecisionTrial ChoosePrecision(
    bool native_bf16, int rows,
    const std::function<absl::StatusOr<double>(Precision)>& seconds,
    double min_speedup = kBf16MinSpeedup);

class TorchScriptModel : public Denoiser {
 public:
  struct Options {
    std::string path;              // the .pt file
    std::string device = "cpu";    // "cpu" or "cuda:N"
    // Run one forward at batch 2 after loading (contract check of shapes),
    // in the precision below (and in fp32 too when that is bf16).
    bool check_forward = true;
    // "fp32", "bf16" (autocast: convolutions and matrix products in bf16,
    // the output cast back to f32) or "auto": by measurement
    // (ChoosePrecision below), bf16 only where the hardware computes it
    // natively (a CPU with avx512_bf16 or amx_bf16, a CUDA device of compute
    // capability >= 8), it passes the contract check, and a forward pass of
    // `timing_rows` rows runs at least kBf16MinSpeedup x faster than fp32.
    std::string precision = "fp32";
    int timing_rows = 32;
    // Replace the network's group-norm-then-SiLU pairs with one fused
    // operator (fused_norm_silu.h) before the contract check. Off by
    // default: the trainer loads through here and saves the module it
    // trains, which must stay plain TorchScript; vdm-server turns it on
    // (--fuse_norm_silu).
    bool fuse_norm_silu = false;
  };

  // Loads and checks the model. A broken model is refused with a message that
  // names the missing or wrong member.
  static absl::StatusOr<std::unique_ptr<TorchScriptModel>> Load(
      const Options& options);
  // Checks an already-loaded module (used by Load and by the trainer).
  static absl::StatusOr<std::unique_ptr<TorchScriptModel>> FromModule(
      torch::jit::Module module, const Options& options);

  ImageShape shape() const override { return shape_; }
  int num_classes() const override { return num_classes_; }
  // Moves the rows to the model's device once (z and gamma as f32, label as
  // i64), runs forward in precision(), converts the output to f32 eps and
  // returns it on z's device (one transfer back).
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override;
  // The same in fp32 whatever precision() is.
  absl::StatusOr<at::Tensor> DenoiseFp32(const at::Tensor& z,
                                         const at::Tensor& gamma,
                                         const at::Tensor& label) override;
  Precision precision() const override { return precision_; }
  // With precision "auto": what was measured and why precision() won.
  const std::optional<PrecisionTrial>& precision_trial() const {
    return trial_;
  }
  // How many group-norm-then-SiLU pairs Options::fuse_norm_silu fused (0
  // when off).
  int fused_norm_silu() const { return fused_norm_silu_; }
  // Denoise with gradients on z, then torch::autograd::grad of <eps, v>.
  absl::StatusOr<EpsVjp> DenoiseVjp(const at::Tensor& z,
                                    const at::Tensor& gamma,
                                    const at::Tensor& label,
                                    const at::Tensor& v) override;
  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override;

  const std::string& prediction() const { return prediction_; }  // eps|v|x
  const std::string& metadata() const { return metadata_; }      // JSON
  const std::string& path() const { return options_.path; }
  const torch::Device& device() const { return device_; }
  // The underlying module (the trainer trains it in place).
  torch::jit::Module& module() { return module_; }

 private:
  TorchScriptModel(torch::jit::Module module, const Options& options,
                   torch::Device device)
      : module_(std::move(module)), options_(options), device_(device) {}
  absl::Status CheckContract();
  absl::Status CheckForward(Precision precision);
  // --precision=auto after the contract check: times both precisions
  // (ChoosePrecision) and keeps the faster.
  void MeasurePrecision();
  absl::StatusOr<at::Tensor> Forward(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label,
                                     Precision precision);

  torch::jit::Module module_;
  Options options_;
  torch::Device device_;
  ImageShape shape_;
  int num_classes_ = 0;
  std::string prediction_;
  std::string metadata_;
  Precision precision_ = Precision::kFp32;
  std::optional<PrecisionTrial> trial_;
  int fused_norm_silu_ = 0;
};

// Resolves a --precision value ("fp32", "bf16", "auto") for `device`
// ("cpu", "cuda:N"); INVALID_ARGUMENT naming `flag` for anything else. For
// "auto" this is the candidate (bf16 where HasNativeBf16), which Load then
// keeps only if it measures faster (ChoosePrecision).
absl::StatusOr<Precision> ResolvePrecision(const std::string& spec,
                                           const std::string& device,
                                           const std::string& flag =
                                               "precision");
// Whether `device` computes bf16 natively (CPU: avx512_bf16 or amx_bf16 in
// /proc/cpuinfo).
bool HasNativeBf16(const std::string& device);

// gamma(t) and d gamma / dt by autograd on t (any device; moved to the
// module's `device`), the one implementation of the schedule's derivative.
// Fails when gamma(t) has the wrong shape or does not depend on t (its
// derivative would read as 0 and drop the diffusion term). With create_graph
// the derivative stays differentiable w.r.t. the schedule's parameters and
// gamma's graph is kept (training); otherwise both are detached.
absl::StatusOr<GammaValues> GammaWithDerivative(torch::jit::Module& module,
                                                const at::Tensor& t,
                                                const torch::Device& device,
                                                bool create_graph);

// The schedule part of the contract check (run by Load unless
// check_forward is off): on `points` evenly spaced t in [0, 1], gamma(t)
// must be finite and strictly increasing and d gamma/dt by autograd finite
// and positive. A failure names gamma and the first bad t.
absl::Status CheckGammaMonotone(torch::jit::Module& module,
                                const torch::Device& device, int points = 64);

// Sets the number of intra-op threads torch uses (Debian's libtorch defaults
// to one); n <= 0 means the CPUs available (cpus.h AvailableCpus: the
// affinity mask lowered to the cgroup quota).
void SetTorchThreads(int n);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_TORCHSCRIPT_MODEL_H_
