// The interface through which the VDM maths talks to a network: given noisy
// images z at per-row log-noise gamma and per-row class labels, predict the
// noise eps. A TorchScript model implements it (torchscript_model.h); tests
// plug in exact oracles.
#ifndef VDM_MODEL_VDM_DENOISER_H_
#define VDM_MODEL_VDM_DENOISER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "model/vdm/image.h"

namespace vdm {

// A gamma schedule evaluated at a vector of times, with its time derivative.
struct GammaValues {
  at::Tensor gamma;       // [B] float32
  at::Tensor dgamma_dt;   // [B] float32
};

// The arithmetic of a forward pass: fp32, or bf16 by autocast (convolutions
// and matrix products in bf16, what follows as autocast's op lists say; the
// output back in f32).
enum class Precision { kFp32, kBf16 };
inline std::string PrecisionName(Precision p) {
  return p == Precision::kBf16 ? "bf16" : "fp32";
}

// Thread-compatible: one caller at a time (the engine gives each worker its
// own replica).
class Denoiser {
 public:
  virtual ~Denoiser() = default;

  virtual ImageShape shape() const = 0;
  // 0 = unconditional; else labels 0..n-1 and n = "no label".
  virtual int num_classes() const = 0;

  // eps_hat for z [B,C,H,W] f32, gamma [B] f32, label [B] i64, whatever the
  // network's own parameterization. Returns f32 [B,C,H,W] on z's device.
  virtual absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                             const at::Tensor& gamma,
                                             const at::Tensor& label) = 0;

  // The precision Denoise computes in, and the same forward pass in full fp32
  // whatever precision() is (the engine evaluates ScoreBPD rows there; see
  // docs/performance.md, "Precision and threads"). An fp32 model needs
  // neither.
  virtual Precision precision() const { return Precision::kFp32; }
  virtual absl::StatusOr<at::Tensor> DenoiseFp32(const at::Tensor& z,
                                                 const at::Tensor& gamma,
                                                 const at::Tensor& label) {
    return Denoise(z, gamma, label);
  }

  // The noise schedule gamma(t) and d gamma / dt at t [B] f32 in [0, 1].
  virtual absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) = 0;
};

}  // namespace vdm

#endif  // VDM_MODEL_VDM_DENOISER_H_
