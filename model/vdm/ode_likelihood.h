// The exact log-likelihood of the dequantized data by the probability-flow
// ODE (Song et al. 2021, "Score-based generative modeling through SDEs"),
// docs/likelihood.md.
//
// With alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) (diffusion.h),
// the variance-preserving forward SDE has drift d log alpha / dt = -0.5
// sigma^2 gamma'(t) and g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt =
// sigma^2 gamma'(t); with the score -eps_hat / sigma its probability-flow ODE
// is dz/dt = -0.5 gamma'(t) sigma^2 (z - eps_hat / sigma). Dividing by
// gamma'(t) it depends on the schedule only through its endpoints:
//   dz/dgamma = -0.5 sigma^2 z + 0.5 sigma eps_hat(z, gamma),
//   div       = -0.5 sigma^2 D + 0.5 sigma tr(d eps_hat / d z),
// and log p_0(z_0) = log p_1(z_1) + int_{gamma(0)}^{gamma(1)} div dgamma
// along the solution from z_0 to z_1, with p_1 = N(0, I).
//
// Convention (bits per dimension of the 0..255 data, as the ELBO's BPD):
// pixels x get uniform dequantization y = x + u, u ~ U[0, 1)^D; the model
// space is f = 2 y / 256 - 1 (the ELBO's bin centre is u = 1/2) and the ODE
// starts at z_0 = alpha_0 f. Then log p(y) = log p_0(z_0) + D log(2 alpha_0
// / 256) and bpd = -log p(y) / (D ln 2). Since P(x) = int p(x + u) du,
// Jensen gives -log2 P(x) <= -E_u log2 p(x + u): the ODE BPD is an (in
// expectation) upper bound on the discrete negative log-likelihood of the
// ODE's own model, like the ELBO's BPD is for the VDM's discrete decoder.
//
// The divergence is the Skilling-Hutchinson estimate v^T J v with fresh
// probes v at every evaluation (unbiased at every quadrature node, so the
// integral is unbiased), J = d eps_hat / d z from Denoiser::DenoiseVjp;
// M probes per image give M independent estimates of log p and a standard
// error when M >= 2. The trajectory z uses the mean of the M rows' eps_hat
// (they are the same input).
//
// Not thread-safe (one caller at a time); the engine's task owns the plan.
#ifndef VDM_MODEL_VDM_ODE_LIKELIHOOD_H_
#define VDM_MODEL_VDM_ODE_LIKELIHOOD_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/request.h"
#include "model/vdm/rows.h"
#include "model/vdm/schedule.h"

namespace vdm {

enum class TraceProbe {
  kRademacher,  // v_i = +-1: the lowest variance; exact for diagonal J
  kGaussian,    // v ~ N(0, I)
};

struct OdeOptions {
  int steps = kDefaultOdeSteps;  // RK4 steps, uniform in gamma, >= 1
  int trace_samples = 1;         // probes per image, >= 1
  TraceProbe probe = TraceProbe::kRademacher;
  // false: uniform dequantization y = x + u (the ODE BPD). true: y = x + 1/2
  // (the bin centres, no dequantization noise; a density, not a bound).
  bool bin_centres = false;
};

// Per image [n] float64, except z1.
struct OdeScores {
  at::Tensor bpd;            // mean over the probes
  at::Tensor stderr_bpd;     // over the probes; NaN with one probe
  at::Tensor log_density;    // log p_0(z_0) in nats (mean over probes)
  at::Tensor prior_log_density;  // log N(z_1; 0, I)
  at::Tensor divergence;     // [n, M] the integral of div per probe
  at::Tensor z0;             // [n, C, H, W] float64, the start
  at::Tensor z1;             // [n, C, H, W] float64, the end
  int64_t function_evaluations = 0;  // per image (each M rows)
};

class OdeLikelihoodPlan : public RowPlan {
 public:
  // x_uint8 [n, C, H, W] (integer dtype), label [n] int64 (num_classes for
  // "no label"). Draws the dequantization from `gen` now and the probes
  // from it at every Next().
  static absl::StatusOr<std::unique_ptr<OdeLikelihoodPlan>> Create(
      const at::Tensor& x_uint8, const at::Tensor& label,
      const OdeOptions& options, const ScheduleFn& schedule, at::Generator gen);

  int64_t num_images() const { return n_; }
  // n x M rows per evaluation: image i's probe m is row i M + m.
  int64_t rows_per_evaluation() const override { return n_ * m_; }
  int64_t evaluations() const { return OdeFunctionEvaluations(steps_); }
  int64_t evaluation() const { return step_ * kOdeStages + stage_; }
  bool done() const override { return step_ >= steps_; }

  // The rows of the current evaluation, with probes (fresh each call; call
  // once per evaluation).
  Rows Next() override;
  // eps_hat and v^T d eps_hat / d z for all rows of the last Next().
  absl::Status Consume(const at::Tensor& eps_hat, const at::Tensor& vjp);
  absl::Status Consume(const Evaluation& out) override {
    return Consume(out.eps, out.vjp);
  }
  absl::StatusOr<OdeScores> Result() const;

 private:
  OdeLikelihoodPlan() = default;
  at::Tensor StageState() const;  // z at the current stage [n,C,H,W] f64
  double StageGamma() const;

  int64_t n_ = 0, m_ = 1, dims_ = 0;
  int steps_ = 0;
  TraceProbe probe_kind_ = TraceProbe::kRademacher;
  double gamma0_ = 0, gamma1_ = 0, h_ = 0, log_alpha0_ = 0;
  at::Generator gen_;
  at::Tensor label_;   // [n M]
  at::Tensor z0_;      // [n,C,H,W] f64
  at::Tensor z_;       // the state at the current step
  at::Tensor div_;     // [n, M] f64, integral so far
  at::Tensor k_[kOdeStages];    // drift at each stage of the current step
  at::Tensor d_[kOdeStages];    // [n, M] divergence at each stage
  at::Tensor probe_;   // the probes of the last Next()
  int step_ = 0, stage_ = 0;
};

// Runs a plan synchronously, `max_rows` rows per forward+backward pass.
absl::StatusOr<OdeScores> OdeLikelihood(Denoiser& model,
                                        const at::Tensor& x_uint8,
                                        const at::Tensor& label,
                                        const OdeOptions& options,
                                        at::Generator gen,
                                        int64_t max_rows = 64);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_ODE_LIKELIHOOD_H_
