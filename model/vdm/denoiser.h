// The interface through which the VDM maths talks to a network: given noisy
// images z at per-row log-noise gamma and per-row class labels, predict the
// noise eps. A TorchScript model implements it (torchscript_model.h); tests
// plug in exact oracles.
#ifndef VDM_MODEL_VDM_DENOISER_H_
#define VDM_MODEL_VDM_DENOISER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "absl/status/statusor.h"
#include "model/vdm/image.h"

namespace vdm {

// A gamma schedule evaluated at a vector of times, with its time derivative.
struct GammaValues {
  at::Tensor gamma;       // [B] float32
  at::Tensor dgamma_dt;   // [B] float32
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

  // The noise schedule gamma(t) and d gamma / dt at t [B] f32 in [0, 1].
  virtual absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) = 0;
};

}  // namespace vdm

#endif  // VDM_MODEL_VDM_DENOISER_H_
