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
// eps_hat and the vector-Jacobian product v^T d eps_hat / d z for
// cotangents v (same shape as z). Rows are independent inputs of the network,
// so row b of `vjp` is v_b^T J_b with J_b the Jacobian of row b's eps_hat
// with respect to row b's z. Both f32 [B,C,H,W] on z's device.
struct EpsVjp {
  at::Tensor eps;
  at::Tensor vjp;
};

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
  // eps_hat and v^T d eps_hat / d z (the probability-flow ODE likelihood,
  // ode_likelihood.h, needs it for the divergence). One forward and one
  // backward pass with gradients. Models that cannot differentiate return
  // UNIMPLEMENTED (the default).
  virtual absl::StatusOr<EpsVjp> DenoiseVjp(const at::Tensor& z,
                                            const at::Tensor& gamma,
                                            const at::Tensor& label,
                                            const at::Tensor& v);

  // The noise schedule gamma(t) and d gamma / dt at t [B] f32 in [0, 1].
  virtual absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) = 0;
};

inline absl::StatusOr<EpsVjp> Denoiser::DenoiseVjp(const at::Tensor&,
                                                   const at::Tensor&,
                                                   const at::Tensor&,
                                                   const at::Tensor&) {
  return absl::UnimplementedError(
      "this model does not provide vector-Jacobian products (DenoiseVjp)");
}

}  // namespace vdm

#endif  // VDM_MODEL_VDM_DENOISER_H_
