// The VDM samplers (docs/design.md, "Sampling") as per-trajectory state
// machines for a continuous-batching engine. A Sampler of n images says what
// the network must evaluate next (Next) and advances when given eps_hat
// (Consume), so rows of different requests at different steps can share a
// forward pass. A SamplingPlan wraps a Sampler with its conditioning: it
// labels the rows and, with classifier-free guidance, pairs each image with
// a "no label" row and combines the two predictions (the only place that
// does). The engine, SampleImages and the trainer's previews all sample
// through a SamplingPlan.
//
// All maths is in gamma (log-SNR lambda = -gamma / 2); the network is
// conditioned on gamma, so a time grid is a sequence of gammas from gamma(1)
// to gamma(0): the last step lands at t = 0, and Images() decodes the most
// likely pixel per dimension.
#ifndef VDM_MODEL_VDM_SAMPLERS_H_
#define VDM_MODEL_VDM_SAMPLERS_H_

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/request.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/rows.h"
#include "model/vdm/sampler_config.h"
#include "model/vdm/schedule.h"

namespace vdm {

// One sampling trajectory of n images. Not thread-safe: one caller at a time
// (a request lives on one worker thread). Tensors live on the CPU; the state
// keeps the dtype of z1 (float32 in the server, float64 possible in tests).
class Sampler {
 public:
  virtual ~Sampler() = default;
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // The n rows of the next network evaluation (valid while !done()); their
  // label is left undefined (the SamplingPlan sets it).
  virtual Rows Next() const;
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
  // The gamma grid [steps + 1], from gamma(t_start) down to gamma(0).
  const at::Tensor& gammas() const { return gammas_; }
  // Overwrites the state where `known` (bool, z's shape) with z_known
  // (inpainting). Between steps only.
  void Blend(const at::Tensor& known, const at::Tensor& z_known);
  // RePaint's jump back (between steps, step() > 0, and only for a sampler
  // that is not multistep in the table, TraitsOf in sampler_config.h: the
  // next step must depend only on z_t): from the
  // state z_s at gamma_s = gammas[step] to z_t at gamma_t = gammas[step-1]
  // by the forward transition q(z_t | z_s):
  //   z_t = alpha_{t|s} z_s + sigma_{t|s} eps,  alpha_{t|s} = alpha_t / alpha_s,
  //   sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2
  //                 = -expm1(gamma_s - gamma_t) sigma_t^2,
  // with eps ~ N(0, I) of z's shape; step() goes back by one.
  void JumpBack(const at::Tensor& eps);

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

// Editing an existing image (all optional; the default is plain sampling).
struct SampleEdit {
  // uint8 [1, C, H, W]: the image to edit.
  at::Tensor reference;
  // Image-to-image (SDEdit, Meng et al. 2022): start from the reference
  // noised to the time t that `strength` names and sample from there;
  // 1 = plain sampling. On the default scale, kNoiseFraction, strength is
  // the noise variance fraction sigma^2(t) = sigmoid(gamma(t)) of the start
  // (what diffusers' strength amounts to), so equal steps of strength change
  // the image about evenly; kTime is the time t itself (with a linear
  // log-SNR schedule its first half adds almost no noise). EditStartTime
  // gives the t.
  enum class StrengthScale { kNoiseFraction, kTime };
  double strength = 1.0;
  StrengthScale strength_scale = StrengthScale::kNoiseFraction;
  // Inpainting (the replacement method): bool [1, C, H, W] or [1, 1, H, W],
  // true where the reference is known. After every step the known pixels
  // are replaced by the reference noised to the new time; the returned
  // images equal the reference exactly there.
  at::Tensor known;
  // Decoding a latent: float [n, C, H, W], the trajectory's start z1 in
  // place of the noise drawn from the seed (DDIM with eta = 0 makes this
  // the inverse of EncodePlan).
  at::Tensor z1;
};

// The time t at which an image-to-image edit starts (strength in (0, 1]):
// on kTime the strength itself; on kNoiseFraction the t with
// sigmoid(gamma(t)) = strength, i.e. gamma(t) = logit(strength) clamped to
// [gamma(0), gamma(1)] (1 -> t = 1), found on `schedule` (increasing) by
// two rounds of a 257-point grid and linear interpolation in gamma, exact to
// float rounding for a linear schedule. Strengths at or below sigma^2(0)
// give the smallest start, t = kMinEditStartTime (the reference, decoded).
inline constexpr double kMinEditStartTime = 1e-6;
absl::StatusOr<double> EditStartTime(const SampleEdit& edit,
                                     const ScheduleFn& schedule);

// A sampling request: a Sampler for n images plus what it is conditioned
// on. Next() returns every row of the next evaluation (n rows, or 2n with
// guidance: rows [0, n) carry the labels, rows [n, 2n) "no label" or the
// negative label); Consume
// takes eps_hat for all of them, combines guided pairs and advances. Not
// thread-safe (one caller at a time).
class SamplingPlan : public RowPlan {
 public:


  // Draws z1 ~ N(0, I) [n, C, H, W] from a generator seeded with `seed` and
  // keeps drawing the sampler's noise from it (so the result depends only on
  // the seed). `labels` [n] int64, when defined, gives each image its own
  // label in [0, num_classes) and overrides conditioning.label.
  static absl::StatusOr<std::unique_ptr<SamplingPlan>> Create(
      const SamplerConfig& sampler, int64_t num_images,
      const Conditioning& conditioning, const ImageShape& shape,
      int num_classes, uint64_t seed, const ScheduleFn& schedule,
      const at::Tensor& labels = at::Tensor(), const SampleEdit& edit = SampleEdit());

  int64_t num_images() const { return n_; }
  bool guided() const { return guided_; }
  // Rows of every evaluation: n or 2n.
  int64_t rows_per_evaluation() const override {
    return guided_ ? 2 * n_ : n_;
  }
  Rows Next() override;
  absl::Status Consume(const at::Tensor& eps_hat);
  absl::Status Consume(const Evaluation& out) override {
    return Consume(out.eps);
  }

  const Sampler& sampler() const { return *sampler_; }
  bool done() const override { return sampler_->done(); }
  // Uint8 [n, C, H, W]: the samples once done() (the reference where known).
  at::Tensor Images() const;

 private:
  SamplingPlan() = default;
  absl::Status Advance(const at::Tensor& eps_hat);
  void ReplaceKnown();

  int64_t n_ = 0;
  int rounds_ = 0;       // RePaint resampling rounds per step
  int round_ = 0;        // jumps back done for the current step
  bool guided_ = false;
  double scale_ = 1.0;
  at::Tensor labels_;  // [n] int64 (num_classes = "no label")
  int64_t second_label_ = 0;  // the guided pair's second row
  std::unique_ptr<Sampler> sampler_;
  at::Tensor reference_, f_, known_;  // edits: [n, C, H, W]
  at::Generator replace_gen_ =
      at::make_generator<at::CPUGeneratorImpl>(0x5eed);
};

// DDIM inversion (encoding, Song et al. 2021; "Inversion" in
// docs/design.md): the probability-flow ODE integrated upwards with DDIM
// (eta = 0) steps from z_0 = alpha_0 f of each image to its latent z_1 at
// t = 1, on the grid of `grid` (steps and time grid; the sampler type and
// eta are not used) read in reverse. Each step from s up to t evaluates the
// network once at (z_s, gamma_s) and moves to
//   z_t = alpha_t x_hat + sigma_t eps_hat,  x_hat = (z_s - sigma_s eps_hat) / alpha_s.
// Decoding the latent with DDIM (eta = 0) on the same grid (SampleEdit::z1)
// gives the image back up to the discretization error, which shrinks with
// the steps. One row per image per step, labelled `label` (-1 = "no
// label"); no guidance. Not thread-safe (one caller at a time).
class EncodePlan : public RowPlan {
 public:
  // images uint8 [n, C, H, W] of `shape`.
  static absl::StatusOr<std::unique_ptr<EncodePlan>> Create(
      const at::Tensor& images, const SamplerConfig& grid, int label,
      const ImageShape& shape, int num_classes, const ScheduleFn& schedule);

  int64_t num_images() const { return labels_.size(0); }
  int64_t rows_per_evaluation() const override { return num_images(); }
  Rows Next() override;
  absl::Status Consume(const at::Tensor& eps_hat);
  absl::Status Consume(const Evaluation& out) override {
    return Consume(out.eps);
  }
  bool done() const override { return sampler_->done(); }
  int step() const { return sampler_->step(); }
  int steps() const { return sampler_->steps(); }
  // The current state; the latents z_1 [n, C, H, W] float32 once done().
  const at::Tensor& z() const { return sampler_->z(); }

 private:
  EncodePlan() = default;
  at::Tensor labels_;  // [n] int64
  std::unique_ptr<Sampler> sampler_;
};

// Encodes images synchronously (tests, tools): the latents float32
// [n, C, H, W].
absl::StatusOr<at::Tensor> EncodeImages(Denoiser& model,
                                        const at::Tensor& images,
                                        const SamplerConfig& grid,
                                        int label = -1);

// A synchronous sampling run (tests, the trainer's previews, tools).
struct SampleOptions {
  SamplerConfig sampler;
  int64_t num_images = 1;
  // label -1 = "no label"; with a label, classifier-free guidance
  // eps_u + s (eps_c - eps_u) unless s == 1 (request.h).
  Conditioning conditioning;
  // [num_images] int64 per-image labels; overrides conditioning.label.
  at::Tensor labels;
  SampleEdit edit;
  uint64_t seed = 0;  // z1 and all noise come from this seed
  const std::atomic<bool>* stop = nullptr;  // set => Cancelled between steps
};

// Samples images (uint8 [n, C, H, W]) with `model`, in one batch per step.
absl::StatusOr<at::Tensor> SampleImages(Denoiser& model,
                                        const SampleOptions& options);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_SAMPLERS_H_
