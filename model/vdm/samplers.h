// The VDM samplers (design.md section 4) as per-trajectory state machines for
// a continuous-batching engine: one Sampler per request of n rows says what
// the network must evaluate next (Next) and advances when given eps_hat
// (Consume), so rows of different requests at different steps can share a
// forward pass. Classifier-free guidance is the caller's business: it
// evaluates the conditional and unconditional rows and passes the guided
// eps_hat (Guide in diffusion.h) to Consume.
//
// All maths is in gamma (log-SNR lambda = -gamma / 2); the network is
// conditioned on gamma, so a time grid is a sequence of gammas from gamma(1)
// to gamma(0): the last step lands at t = 0, and Images() decodes the most
// likely pixel per dimension.
#ifndef VDM_MODEL_VDM_SAMPLERS_H_
#define VDM_MODEL_VDM_SAMPLERS_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/sampler_config.h"
#include "model/vdm/schedule.h"

namespace vdm {

// Inputs of one network evaluation of a sampler's n rows.
struct NetworkInput {
  at::Tensor z;      // [n, C, H, W] float32
  at::Tensor gamma;  // [n] float32
};

// One sampling trajectory of n images. Not thread-safe: one caller at a time
// (a request lives on one worker thread). Tensors live on the CPU; the state
// keeps the dtype of z1 (float32 in the server, float64 possible in tests).
class Sampler {
 public:
  virtual ~Sampler() = default;
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // Inputs of the next network evaluation (valid while !done()).
  virtual NetworkInput Next() const;
  // eps_hat [n, C, H, W] (any float dtype, any device) for the rows of the
  // last Next(); advances the state. Draws noise from the sampler's own
  // generator, so the result does not depend on what shares the batch.
  absl::Status Consume(const at::Tensor& eps_hat);

  bool done() const { return step_ >= steps(); }
  int step() const { return step_; }  // steps completed, 0..steps()
  int steps() const { return static_cast<int>(gammas_.size(0)) - 1; }
  // Network evaluations per row so far (NFE).
  int64_t evaluations() const { return evaluations_; }
  // The current state z_t; at the end z_0.
  const at::Tensor& z() const { return z_; }
  // The latest data prediction x_hat in model space (previews); undefined
  // before the first Consume.
  const at::Tensor& x_hat() const { return x_hat_; }
  // The images (uint8 [n, C, H, W]): the decoder's most likely value of the
  // current state; the samples once done().
  at::Tensor Images() const;
  // The gamma grid [steps + 1], from gamma(1) down to gamma(0).
  const at::Tensor& gammas() const { return gammas_; }

 protected:
  Sampler(at::Tensor z1, at::Tensor gammas, at::Generator gen);

  // Called by Consume with eps_hat in the state's dtype; advances z_.
  virtual void Advance(const at::Tensor& eps_hat) = 0;
  // gamma_i as a [1] tensor of the state's dtype.
  at::Tensor GammaAt(int i) const { return gammas_.narrow(0, i, 1); }
  at::Tensor Noise() const;

  at::Tensor z_;
  at::Tensor x_hat_;
  int step_ = 0;
  int64_t evaluations_ = 0;

 private:
  const at::Tensor gammas_;
  mutable at::Generator gen_;
};

// A sampler for n = z1.size(0) images starting at z1 ~ N(0, I) (drawn by
// the caller, typically from `gen`). `schedule` is called once or twice,
// here, to build the grid. Fails on a bad config or a non-monotone schedule.
absl::StatusOr<std::unique_ptr<Sampler>> MakeSampler(
    const SamplerConfig& config, const at::Tensor& z1,
    const ScheduleFn& schedule, at::Generator gen);

// A synchronous sampling run (tests, the trainer's previews, tools).
struct SampleOptions {
  SamplerConfig sampler;
  int64_t num_images = 1;
  int64_t label = -1;  // -1 = "no label" (num_classes)
  // With a label: classifier-free guidance eps_u + s (eps_c - eps_u), two
  // rows per image unless s == 1.
  double guidance_scale = 1.0;
  uint64_t seed = 0;  // z1 and all noise come from this seed
};

// Samples images (uint8 [n, C, H, W]) with `model`, in one batch per step.
absl::StatusOr<at::Tensor> SampleImages(Denoiser& model,
                                        const SampleOptions& options);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_SAMPLERS_H_
