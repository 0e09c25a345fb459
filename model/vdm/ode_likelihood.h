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
// Dequantization (OdeOptions::dequantization). P(x) of the 8-bit pixels x
// is a discrete probability; the ODE gives a density, so it is bounded by
// a dequantizer q(z_0 | x) (docs/likelihood.md):
// - kGaussian (the default): the VDM's own forward step, z_0 = alpha_0
//   f(x) + sigma_0 eps, f the bin centre 2 (x + 1/2) / 256 - 1, with the
//   VDM's discrete decoder p(x | z_0) (a 256-way softmax per pixel, as the
//   ELBO's reconstruction term). Then
//     -log P(x) <= E_q[-log p(x | z_0) + log q(z_0 | x) - log p_ODE(z_0)],
//   the gap being E_q KL(q(z_0 | x) || p(z_0 | x)): small where the decoder
//   is sharp, as it is at sigma_0 / alpha_0 = exp(gamma_0 / 2).
// - kUniform: y = x + u, u ~ U[0, 1)^D, model space f = 2 y / 256 - 1,
//   z_0 = alpha_0 f: log p(y) = log p_0(z_0) + D log(2 alpha_0 / 256) and
//   -log2 P(x) <= -E_u log2 p(x + u) (Jensen). sigma_0 is a sixth of a bin,
//   so p_0 peaks at the bin centres and uniform noise lands between the
//   peaks: a loose bound (+0.5 bits/dim over the ELBO on the shipped model).
// - kBinCentres: u = 1/2, a density value, not a bound.
// bpd = the bound in nats / (D ln 2), as the ELBO's BPD.
//
// Trajectories. Each image gets M = trace_samples independent solves, each
// with its own dequantization draw and its own Hutchinson probe v, drawn
// at Create and fixed along the solve (so the integrand is a smooth
// function of gamma and an adaptive solver can control its error; the
// estimate v^T J v is unbiased at every node, so the integral is too). The
// score is the mean over the M solves and its standard error their spread,
// which covers the dequantization and the trace estimator together.
//
// Solvers (OdeOptions::solver). Dormand-Prince 5(4) (the default) adapts
// each trajectory's steps in gamma to rtol / atol on the state (z, and the
// log-density integral on its own, so the D components of z do not dilute
// it), with the 5th-order solution propagated and the standard controller
// (Hairer, Norsett & Wanner, II.4). Rows carry their own gamma, so every
// trajectory takes its own steps inside the shared batches; a finished
// trajectory stops costing rows. Its error estimate is the sum over
// accepted steps of the embedded estimate's effect on log p (the
// log-density integral's local error plus z_1 . dz for the prior term), in
// bits/dim. RK4 on a uniform grid (kRk4) is the fixed-cost reference.
//
// Not thread-safe (one caller at a time); the engine's task owns the plan.
#ifndef VDM_MODEL_VDM_ODE_LIKELIHOOD_H_
#define VDM_MODEL_VDM_ODE_LIKELIHOOD_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/request.h"
#include "model/vdm/rows.h"
#include "model/vdm/schedule.h"

namespace vdm {

// Per image [n] float64 unless said otherwise. Trajectory m of image i is
// row i M + m of the [n M, ...] tensors.
struct OdeScores {
  at::Tensor bpd;            // mean over the trajectories
  at::Tensor stderr_bpd;     // over the trajectories; NaN with one
  // The solver's error estimate of bpd (kDormandPrince); NaN for kRk4.
  at::Tensor solver_error_bpd;
  at::Tensor evaluations;    // [n] int64: per trajectory, the mean over M
  at::Tensor log_density;    // [n, M] log p_ODE(z_0) in nats (model space z)
  at::Tensor prior_log_density;  // [n, M] log N(z_1; 0, I)
  at::Tensor divergence;     // [n, M] the integral of div
  // [n, M] nats: -log p(x | z_0) + log q(z_0 | x) (kGaussian), or
  // -D log(2 alpha_0 / 256) (kUniform, kBinCentres): bound = this -
  // log_density.
  at::Tensor dequantization;
  at::Tensor z0;             // [n M, C, H, W] float64, the starts
  at::Tensor z1;             // [n M, C, H, W] float64, the ends
  int64_t total_evaluations = 0;  // rows evaluated, all trajectories
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
  // One row per unfinished trajectory per evaluation (n M at first).
  int64_t rows_per_evaluation() const override { return active_.size(0); }
  bool done() const override { return active_.size(0) == 0; }
  // Evaluations so far (rows of all trajectories).
  int64_t total_evaluations() const { return total_evaluations_; }

  // The rows of the current stage of every unfinished trajectory.
  Rows Next() override;
  // eps_hat and v^T d eps_hat / d z for all rows of the last Next().
  absl::Status Consume(const at::Tensor& eps_hat, const at::Tensor& vjp);
  absl::Status Consume(const Evaluation& out) override {
    return Consume(out.eps, out.vjp);
  }
  absl::StatusOr<OdeScores> Result() const;

 private:
  OdeLikelihoodPlan() = default;
  void EndStep();  // after the last stage: accept or reject, next h

  int64_t n_ = 0, m_ = 1, dims_ = 0;
  std::vector<int64_t> image_dims_;  // C, H, W
  OdeOptions options_;
  double gamma0_ = 0, gamma1_ = 0;
  at::Tensor label_, probe_;  // [R] int64, [R, D] f32 (R = n M)
  at::Tensor dequantization_;  // [R] nats (see OdeScores)
  at::Tensor z0_;              // [R, D] f64
  // Per trajectory [R]: the state, the step size, the evaluations and the
  // error estimate (nats).
  at::Tensor z_, logp_, gamma_, h_, evaluations_, error_;
  at::Tensor active_;          // [A] int64: the unfinished trajectories
  at::Tensor forced_;          // [A] bool: take the rest in one step
  // Of the active trajectories, this step: the stage states and slopes.
  at::Tensor stage_z_, stage_gamma_;
  std::vector<at::Tensor> k_, d_;  // [A, D], [A]
  int stage_ = 0;
  bool first_step_ = true;
  at::Tensor rejected_;        // [A] bool: the last attempt was rejected
  int64_t total_evaluations_ = 0;
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
