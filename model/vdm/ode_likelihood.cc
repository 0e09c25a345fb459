#include "model/vdm/ode_likelihood.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// Classical RK4: stage i evaluates at gamma + c_i h, z + a_i h k_{i-1}.
constexpr double kC[kOdeStages] = {0.0, 0.5, 0.5, 1.0};
constexpr double kB[kOdeStages] = {1.0 / 6, 1.0 / 3, 1.0 / 3, 1.0 / 6};

double Sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

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
  if (options.steps < 1 || options.steps > kMaxOdeSteps) {
    return absl::InvalidArgumentError(
        absl::StrCat("ode_steps: ", options.steps, " is out of range [1, ",
                     kMaxOdeSteps, "]"));
  }
  if (options.trace_samples < 1 || options.trace_samples > kMaxTraceSamples) {
    return absl::InvalidArgumentError(
        absl::StrCat("trace_samples: ", options.trace_samples,
                     " is out of range [1, ", kMaxTraceSamples, "]"));
  }
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
  p->n_ = x_uint8.size(0);
  p->m_ = options.trace_samples;
  p->dims_ = x_uint8[0].numel();
  p->steps_ = options.steps;
  p->probe_kind_ = options.probe;
  p->h_ = (p->gamma1_ - p->gamma0_) / options.steps;
  p->log_alpha0_ = 0.5 * std::log(Sigmoid(-p->gamma0_));
  p->gen_ = gen;
  p->label_ = label.to(at::kCPU).to(at::kLong).repeat_interleave(p->m_);
  const at::Tensor x = x_uint8.to(at::kCPU).to(at::kDouble);
  at::Tensor u;
  if (options.bin_centres) {
    u = at::full_like(x, 0.5);
  } else {
    u = at::rand(x.sizes(), gen, at::kDouble);
  }
  const at::Tensor f = 2.0 * (x + u) / 256.0 - 1.0;
  p->z0_ = std::exp(p->log_alpha0_) * f;
  p->z_ = p->z0_;
  p->div_ = at::zeros({p->n_, p->m_}, at::kDouble);
  return p;
}

double OdeLikelihoodPlan::StageGamma() const {
  return gamma0_ + (step_ + kC[stage_]) * h_;
}

at::Tensor OdeLikelihoodPlan::StageState() const {
  if (stage_ == 0) return z_;
  return z_ + (kC[stage_] * h_) * k_[stage_ - 1];
}

Rows OdeLikelihoodPlan::Next() {
  Rows r;
  if (done()) return r;
  const at::Tensor z = StageState();
  r.z = z.to(at::kFloat).repeat_interleave(m_, 0);
  r.gamma = at::full({n_ * m_}, StageGamma(), at::kFloat);
  r.label = label_;
  if (probe_kind_ == TraceProbe::kGaussian) {
    probe_ = at::randn(r.z.sizes(), gen_, at::kFloat);
  } else {
    probe_ = at::bernoulli(at::full(r.z.sizes(), 0.5, at::kFloat), gen_) *
                 2.0 - 1.0;
  }
  r.probe = probe_;
  return r;
}

absl::Status OdeLikelihoodPlan::Consume(const at::Tensor& eps_hat,
                                        const at::Tensor& vjp) {
  if (done()) return absl::InternalError("ode likelihood: already done");
  if (eps_hat.size(0) != n_ * m_ || vjp.sizes() != eps_hat.sizes() ||
      !probe_.defined()) {
    return absl::InternalError("ode likelihood: Consume without Next rows");
  }
  const double gamma = StageGamma();
  const double sigma2 = Sigmoid(gamma), sigma = std::sqrt(sigma2);
  const at::Tensor eps = eps_hat.to(at::kCPU).to(at::kDouble);
  std::vector<int64_t> grouped = {n_, m_};
  for (int64_t d = 1; d < eps.dim(); ++d) grouped.push_back(eps.size(d));
  const at::Tensor eps_mean = eps.reshape(grouped).mean(1);
  // v^T J v per row, [n, M].
  const at::Tensor quad = (probe_.to(at::kDouble) *
                           vjp.to(at::kCPU).to(at::kDouble))
                              .reshape({n_, m_, -1})
                              .sum(-1);
  const at::Tensor z = StageState();
  k_[stage_] = -0.5 * sigma2 * z + 0.5 * sigma * eps_mean;
  d_[stage_] = -0.5 * sigma2 * static_cast<double>(dims_) + 0.5 * sigma * quad;
  probe_ = at::Tensor();
  if (++stage_ < kOdeStages) return absl::OkStatus();
  at::Tensor dz = at::zeros_like(z_);
  for (int i = 0; i < kOdeStages; ++i) {
    dz = dz + kB[i] * k_[i];
    div_ = div_ + (kB[i] * h_) * d_[i];
  }
  z_ = z_ + h_ * dz;
  stage_ = 0;
  ++step_;
  return absl::OkStatus();
}

absl::StatusOr<OdeScores> OdeLikelihoodPlan::Result() const {
  if (!done()) {
    return absl::FailedPreconditionError("ode likelihood: not finished");
  }
  OdeScores s;
  const double d = static_cast<double>(dims_);
  s.z0 = z0_;
  s.z1 = z_;
  s.prior_log_density = -0.5 * z_.reshape({n_, -1}).pow(2).sum(1) -
                        0.5 * d * std::log(2 * M_PI);
  s.divergence = div_;
  const at::Tensor log_p = s.prior_log_density.unsqueeze(1) + div_;  // [n, M]
  s.log_density = log_p.mean(1);
  // log p(y) = log p_0(z_0) + D log(2 alpha_0 / 256), y in [0, 256)^D.
  const at::Tensor bpd =
      -(log_p + d * (log_alpha0_ + std::log(2.0 / 256.0))) / (d * M_LN2);
  s.bpd = bpd.mean(1);
  if (m_ >= 2) {
    s.stderr_bpd = bpd.std(1, /*unbiased=*/true) / std::sqrt(double(m_));
  } else {
    s.stderr_bpd =
        at::full({n_}, std::numeric_limits<double>::quiet_NaN(), at::kDouble);
  }
  s.function_evaluations = evaluations();
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
