#include "model/vdm/ode_likelihood.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// An explicit Runge-Kutta method: stage s evaluates at gamma + c_s h,
// z + h sum_{j<s} a_sj k_j; the step propagates z + h sum b_j k_j and, with
// an embedded pair, estimates its error as h sum e_j k_j.
struct Tableau {
  int stages;
  std::vector<double> c;
  std::vector<std::vector<double>> a;
  std::vector<double> b;
  std::vector<double> e;  // b - b_hat; empty = no error estimate
  bool fsal;              // the last stage is the next step's first
};

// Dormand & Prince 1980, RK5(4)7FM (Hairer, Norsett & Wanner, Table II.5.2).
const Tableau& DormandPrince() {
  static const Tableau t{
      7,
      {0.0, 1.0 / 5, 3.0 / 10, 4.0 / 5, 8.0 / 9, 1.0, 1.0},
      {{},
       {1.0 / 5},
       {3.0 / 40, 9.0 / 40},
       {44.0 / 45, -56.0 / 15, 32.0 / 9},
       {19372.0 / 6561, -25360.0 / 2187, 64448.0 / 6561, -212.0 / 729},
       {9017.0 / 3168, -355.0 / 33, 46732.0 / 5247, 49.0 / 176,
        -5103.0 / 18656},
       {35.0 / 384, 0.0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784,
        11.0 / 84}},
      {35.0 / 384, 0.0, 500.0 / 1113, 125.0 / 192, -2187.0 / 6784, 11.0 / 84,
       0.0},
      {35.0 / 384 - 5179.0 / 57600, 0.0, 500.0 / 1113 - 7571.0 / 16695,
       125.0 / 192 - 393.0 / 640, -2187.0 / 6784 + 92097.0 / 339200,
       11.0 / 84 - 187.0 / 2100, -1.0 / 40},
      true};
  return t;
}

const Tableau& Rk4() {
  static const Tableau t{kRk4Stages,
                         {0.0, 0.5, 0.5, 1.0},
                         {{}, {0.5}, {0.0, 0.5}, {0.0, 0.0, 1.0}},
                         {1.0 / 6, 1.0 / 3, 1.0 / 3, 1.0 / 6},
                         {},
                         false};
  return t;
}

const Tableau& TableauOf(OdeSolver solver) {
  return solver == OdeSolver::kRk4 ? Rk4() : DormandPrince();
}

// sum_j w_j x_j over the defined x_j with w_j != 0 (x all the same shape).
at::Tensor Combine(const std::vector<double>& w,
                   const std::vector<at::Tensor>& x) {
  at::Tensor sum;
  for (size_t j = 0; j < w.size() && j < x.size(); ++j) {
    if (w[j] == 0.0 || !x[j].defined()) continue;
    sum = sum.defined() ? sum + w[j] * x[j] : w[j] * x[j];
  }
  return sum;
}

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// Controller constants (Hairer, Norsett & Wanner, II.4): safety factor,
// bounds on the step's growth and shrinkage, first step as a fraction of
// the interval at most.
constexpr double kSafety = 0.9, kMaxGrowth = 5.0, kMaxShrink = 0.2;
constexpr double kMaxFirstStep = 0.05;
// No step longer than this fraction of [gamma(0), gamma(1)]: a long step
// can pass over a sharp change of the flow with both of the pair's
// solutions agreeing, so that the error estimate never sees it (measured on
// the oracle, where the posterior switches between pixel values:
// docs/likelihood.md).
constexpr double kMaxStep = 1.0 / 16;

}  // namespace

absl::StatusOr<std::unique_ptr<OdeLikelihoodPlan>> OdeLikelihoodPlan::Create(
    const at::Tensor& x_uint8, const at::Tensor& label,
    const OdeOptions& options, const ScheduleFn& schedule, at::Generator gen) {
  if (x_uint8.dim() != 4 || x_uint8.size(0) < 1) {
    return absl::InvalidArgumentError("ode likelihood: x must be [n,C,H,W]");
  }
  if (label.dim() != 1 || label.size(0) != x_uint8.size(0)) {
    return absl::InvalidArgumentError("ode likelihood: label must be [n]");
  }
  VDM_RETURN_IF_ERROR(CheckOdeOptions(options));
  VDM_ASSIGN_OR_RETURN(GammaValues g,
                       schedule(at::tensor({0.0f, 1.0f}, at::kFloat)));
  const at::Tensor gamma = g.gamma.to(at::kCPU).to(at::kDouble);
  std::unique_ptr<OdeLikelihoodPlan> p(new OdeLikelihoodPlan());
  p->gamma0_ = gamma[0].item<double>();
  p->gamma1_ = gamma[1].item<double>();
  if (!(p->gamma1_ > p->gamma0_) || !std::isfinite(p->gamma0_) ||
      !std::isfinite(p->gamma1_)) {
    return absl::InvalidArgumentError(
        "ode likelihood: gamma(1) must be finite and above gamma(0)");
  }
  p->options_ = options;
  p->n_ = x_uint8.size(0);
  p->m_ = options.trace_samples;
  p->dims_ = x_uint8[0].numel();
  p->image_dims_ = x_uint8.sizes().slice(1).vec();
  const int64_t rows = p->n_ * p->m_, d = p->dims_;
  p->label_ = label.to(at::kCPU).to(at::kLong).repeat_interleave(p->m_);
  const at::Tensor x8 = x_uint8.to(at::kCPU).repeat_interleave(p->m_, 0);
  const at::Tensor x = x8.to(at::kDouble).reshape({rows, d});
  const double log_alpha0 = 0.5 * std::log(Sigmoid(-p->gamma0_));
  const double log_sigma0 = 0.5 * std::log(Sigmoid(p->gamma0_));
  // The draws, in this order whatever the solver: the dequantization, then
  // the probes (so a reference solve with another solver sees the same).
  switch (options.dequantization) {
    case Dequantization::kGaussian: {
      const at::Tensor eps0 = at::randn({rows, d}, gen, at::kDouble);
      const at::Tensor f = (2.0 * x + 1.0) / 256.0 - 1.0;
      p->z0_ = std::exp(log_alpha0) * f + std::exp(log_sigma0) * eps0;
      const at::Tensor recon = ReconstructionNll(
          x8, at::full({1}, p->gamma0_, at::kDouble), eps0.view(x8.sizes()));
      const at::Tensor log_q = -0.5 * eps0.pow(2).sum(1) -
                               d * (log_sigma0 + 0.5 * std::log(2 * M_PI));
      p->dequantization_ = recon + log_q;
      break;
    }
    case Dequantization::kUniform:
    case Dequantization::kBinCentres: {
      const at::Tensor u = options.dequantization == Dequantization::kUniform
                               ? at::rand({rows, d}, gen, at::kDouble)
                               : at::full({rows, d}, 0.5, at::kDouble);
      p->z0_ = std::exp(log_alpha0) * (2.0 * (x + u) / 256.0 - 1.0);
      // log p(y) = log p_0(z_0) + D log(2 alpha_0 / 256).
      p->dequantization_ = at::full(
          {rows}, -d * (log_alpha0 + std::log(2.0 / 256.0)), at::kDouble);
      break;
    }
  }
  if (options.probe == TraceProbe::kGaussian) {
    p->probe_ = at::randn({rows, d}, gen, at::kFloat);
  } else {
    p->probe_ =
        at::bernoulli(at::full({rows, d}, 0.5, at::kFloat), gen) * 2.0 - 1.0;
  }
  p->z_ = p->z0_.clone();
  p->logp_ = at::zeros({rows}, at::kDouble);
  p->gamma_ = at::full({rows}, p->gamma0_, at::kDouble);
  p->h_ = at::full({rows},
                   options.solver == OdeSolver::kRk4
                       ? (p->gamma1_ - p->gamma0_) / options.steps
                       : 0.0,
                   at::kDouble);
  p->evaluations_ = at::zeros({rows}, at::kLong);
  p->error_ = at::zeros({rows}, at::kDouble);
  p->forced_ = at::zeros({rows}, at::kBool);
  p->rejected_ = at::zeros({rows}, at::kBool);
  p->active_ = at::arange(rows, at::kLong);
  const int stages = TableauOf(options.solver).stages;
  p->k_.resize(stages);
  p->d_.resize(stages);
  return p;
}

Rows OdeLikelihoodPlan::Next() {
  Rows r;
  if (done()) return r;
  const Tableau& t = TableauOf(options_.solver);
  const int64_t a = active_.size(0);
  const at::Tensor h = h_.index_select(0, active_);
  at::Tensor z = z_.index_select(0, active_);
  if (stage_ > 0) {
    z = z + h.unsqueeze(1) * Combine(t.a[stage_], k_);
  }
  stage_z_ = z;
  stage_gamma_ = gamma_.index_select(0, active_) + t.c[stage_] * h;
  std::vector<int64_t> shape = {a};
  shape.insert(shape.end(), image_dims_.begin(), image_dims_.end());
  r.z = z.to(at::kFloat).reshape(shape);
  r.gamma = stage_gamma_.to(at::kFloat);
  r.label = label_.index_select(0, active_);
  r.probe = probe_.index_select(0, active_).reshape(shape);
  return r;
}

absl::Status OdeLikelihoodPlan::Consume(const at::Tensor& eps_hat,
                                        const at::Tensor& vjp) {
  if (done()) return absl::InternalError("ode likelihood: already done");
  const int64_t a = active_.size(0);
  if (!stage_z_.defined() || eps_hat.size(0) != a ||
      vjp.sizes() != eps_hat.sizes()) {
    return absl::InternalError("ode likelihood: Consume without Next rows");
  }
  const at::Tensor sigma2 = at::sigmoid(stage_gamma_);
  const at::Tensor sigma = sigma2.sqrt();
  const at::Tensor eps = eps_hat.to(at::kCPU).to(at::kDouble).reshape({a, -1});
  // v^T J v per trajectory.
  const at::Tensor quad = (probe_.index_select(0, active_).to(at::kDouble) *
                           vjp.to(at::kCPU).to(at::kDouble).reshape({a, -1}))
                              .sum(1);
  k_[stage_] = -0.5 * sigma2.unsqueeze(1) * stage_z_ +
               0.5 * sigma.unsqueeze(1) * eps;
  d_[stage_] = -0.5 * static_cast<double>(dims_) * sigma2 + 0.5 * sigma * quad;
  evaluations_.index_add_(0, active_, at::ones({a}, at::kLong));
  total_evaluations_ += a;
  if (first_step_ && stage_ == 0 && options_.solver != OdeSolver::kRk4) {
    // First step (Hairer, Norsett & Wanner, II.4, (a)-(b)): 1% of the
    // ratio of the state's size to its slope's, in tolerance units.
    const at::Tensor scale = options_.atol + options_.rtol * stage_z_.abs();
    const at::Tensor d0 = (stage_z_ / scale).pow(2).mean(1).sqrt();
    const at::Tensor d1 = (k_[0] / scale).pow(2).mean(1).sqrt();
    const double range = gamma1_ - gamma0_;
    at::Tensor h0 = at::where((d0 < 1e-5) | (d1 < 1e-5),
                              at::full_like(d0, 1e-6 * range),
                              0.01 * d0 / d1);
    h0 = h0.clamp(1e-6 * range, kMaxFirstStep * range);
    h_.index_copy_(0, active_, h0);
  }
  stage_z_ = at::Tensor();
  if (++stage_ < TableauOf(options_.solver).stages) return absl::OkStatus();
  EndStep();
  return absl::OkStatus();
}

void OdeLikelihoodPlan::EndStep() {
  const Tableau& t = TableauOf(options_.solver);
  const at::Tensor z = z_.index_select(0, active_);
  const at::Tensor logp = logp_.index_select(0, active_);
  const at::Tensor gamma = gamma_.index_select(0, active_);
  const at::Tensor h = h_.index_select(0, active_);
  const at::Tensor z_new = z + h.unsqueeze(1) * Combine(t.b, k_);
  const at::Tensor logp_new = logp + h * Combine(t.b, d_);
  at::Tensor accept, h_next = h, estimate;
  if (t.e.empty()) {
    accept = at::ones_like(h, at::kBool);
  } else {
    const at::Tensor ez = h.unsqueeze(1) * Combine(t.e, k_);
    const at::Tensor el = h * Combine(t.e, d_);
    const at::Tensor scale_z =
        options_.atol + options_.rtol * at::maximum(z.abs(), z_new.abs());
    const at::Tensor scale_l =
        options_.atol + options_.rtol * at::maximum(logp.abs(), logp_new.abs());
    const at::Tensor err = at::maximum((ez / scale_z).pow(2).mean(1).sqrt(),
                                       el.abs() / scale_l);
    // A non-finite error ends the trajectory (its score is then not
    // finite, and Result() says so) rather than shrinking h forever.
    accept = (err <= 1.0) | forced_.index_select(0, active_) |
             ~at::isfinite(err);
    at::Tensor fac = (kSafety * err.pow(-0.2)).nan_to_num(1.0, kMaxGrowth,
                                                          kMaxShrink);
    fac = fac.clamp(kMaxShrink, kMaxGrowth);
    // No growth right after a rejection.
    fac = at::where(rejected_.index_select(0, active_), fac.clamp_max(1.0),
                    fac);
    h_next = h * fac;
    // The step's error in log p: the integral's local error and, through
    // the prior's log N(z_1; 0, I), z . dz.
    estimate = el.abs() + (z_new * ez).sum(1).abs();
    // A step forced by the evaluation cap past its tolerance has no
    // estimate worth the name: the solve did not converge, and says so.
    estimate = at::where(forced_.index_select(0, active_) & (err > 1.0),
                         at::full_like(estimate, INFINITY), estimate);
  }
  const at::Tensor taken = active_.masked_select(accept);
  z_.index_copy_(0, taken, z_new.index({accept}));
  logp_.index_copy_(0, taken, logp_new.masked_select(accept));
  gamma_.index_copy_(0, taken, (gamma + h).masked_select(accept));
  if (estimate.defined()) {
    error_.index_add_(0, taken, estimate.masked_select(accept));
  }
  rejected_.index_copy_(0, active_, ~accept);
  const double range = gamma1_ - gamma0_;
  const at::Tensor remaining = gamma1_ - gamma_.index_select(0, active_);
  const at::Tensor finished = remaining <= 1e-10 * range;
  if (!t.e.empty()) {
    // At most max_evaluations: when a further attempt would not leave room
    // for one more, the next step takes the rest of the interval.
    const int64_t per_step = t.fsal ? t.stages - 1 : t.stages;
    const at::Tensor forced =
        evaluations_.index_select(0, active_) + 2 * per_step >
        options_.max_evaluations;
    forced_.index_copy_(0, active_, forced);
    h_next = h_next.clamp_max(kMaxStep * range);
    h_.index_copy_(0, active_,
                   at::where(forced, remaining, at::minimum(h_next, remaining)));
  }
  const at::Tensor keep = ~finished;
  at::Tensor k_first, d_first;
  if (t.fsal) {
    k_first = at::where(accept.unsqueeze(1), k_[t.stages - 1], k_[0]);
    d_first = at::where(accept, d_[t.stages - 1], d_[0]);
  }
  active_ = active_.masked_select(keep);
  for (auto& k : k_) k = at::Tensor();
  for (auto& d : d_) d = at::Tensor();
  if (t.fsal) {
    k_[0] = k_first.index({keep});
    d_[0] = d_first.masked_select(keep);
  }
  stage_ = t.fsal ? 1 : 0;
  first_step_ = false;
}

absl::StatusOr<OdeScores> OdeLikelihoodPlan::Result() const {
  if (!done()) {
    return absl::FailedPreconditionError("ode likelihood: not finished");
  }
  OdeScores s;
  const double d = static_cast<double>(dims_);
  const double per_bpd = 1.0 / (d * M_LN2);
  std::vector<int64_t> shape = {n_ * m_};
  shape.insert(shape.end(), image_dims_.begin(), image_dims_.end());
  s.z0 = z0_.reshape(shape);
  s.z1 = z_.reshape(shape);
  const at::Tensor prior =
      -0.5 * z_.pow(2).sum(1) - 0.5 * d * std::log(2 * M_PI);
  s.prior_log_density = prior.reshape({n_, m_});
  s.divergence = logp_.reshape({n_, m_});
  s.log_density = (prior + logp_).reshape({n_, m_});
  s.dequantization = dequantization_.reshape({n_, m_});
  const at::Tensor bpd = (s.dequantization - s.log_density) * per_bpd;
  if (!at::isfinite(bpd).all().item<bool>()) {
    return absl::InternalError(
        "ode likelihood: the solve diverged (a non-finite log-density); the "
        "network's outputs are not finite along the path");
  }
  s.bpd = bpd.mean(1);
  if (m_ >= 2) {
    s.stderr_bpd = bpd.std(1, /*unbiased=*/true) / std::sqrt(double(m_));
  } else {
    s.stderr_bpd =
        at::full({n_}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
  }
  if (options_.solver == OdeSolver::kRk4) {
    s.solver_error_bpd =
        at::full({n_}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
  } else {
    s.solver_error_bpd = (error_ * per_bpd).reshape({n_, m_}).mean(1);
  }
  s.evaluations = evaluations_.reshape({n_, m_})
                      .to(at::kDouble)
                      .mean(1)
                      .round()
                      .to(at::kLong);
  s.total_evaluations = total_evaluations_;
  return s;
}

absl::StatusOr<OdeScores> OdeLikelihood(Denoiser& model,
                                        const at::Tensor& x_uint8,
                                        const at::Tensor& label,
                                        const OdeOptions& options,
                                        at::Generator gen, int64_t max_rows) {
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<OdeLikelihoodPlan> plan,
                       OdeLikelihoodPlan::Create(x_uint8, label, options,
                                                 ScheduleOf(model), gen));
  max_rows = std::max<int64_t>(1, max_rows);
  while (!plan->done()) {
    const Rows rows = plan->Next();
    std::vector<at::Tensor> eps, vjp;
    for (int64_t b = 0; b < rows.size(); b += max_rows) {
      const int64_t m = std::min(max_rows, rows.size() - b);
      VDM_ASSIGN_OR_RETURN(EpsVjp out, EvaluateVjp(model, rows.Slice(b, m)));
      eps.push_back(out.eps);
      vjp.push_back(out.vjp);
    }
    VDM_RETURN_IF_ERROR(plan->Consume(at::cat(eps), at::cat(vjp)));
  }
  return plan->Result();
}

}  // namespace vdm
