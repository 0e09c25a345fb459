#include "model/vdm/likelihood.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// [m] + the image dimensions of `like` (dropping its first dimension).
std::vector<int64_t> RowShape(int64_t m, const at::Tensor& like) {
  std::vector<int64_t> shape = {m};
  for (int64_t i = 1; i < like.dim(); ++i) shape.push_back(like.size(i));
  return shape;
}

// Evaluates the schedule at t (float64 [B]) and checks its answer.
absl::StatusOr<GammaValues> Evaluate(const ScheduleFn& schedule,
                                     const at::Tensor& t) {
  VDM_ASSIGN_OR_RETURN(GammaValues g, schedule(t.to(at::kFloat)));
  if (!g.gamma.defined() || !g.dgamma_dt.defined() ||
      g.gamma.numel() != t.numel() || g.dgamma_dt.numel() != t.numel()) {
    return absl::InvalidArgumentError("schedule returned a wrong shape");
  }
  GammaValues out{g.gamma.to(at::kCPU).to(at::kDouble).reshape({-1}),
                  g.dgamma_dt.to(at::kCPU).to(at::kDouble).reshape({-1})};
  if (!at::isfinite(out.gamma).all().item<bool>() ||
      !at::isfinite(out.dgamma_dt).all().item<bool>()) {
    return absl::InvalidArgumentError("schedule returned non-finite values");
  }
  return out;
}

absl::Status CheckInputs(const at::Tensor& x, const LikelihoodOptions& o) {
  if (!x.defined() || x.dim() != 4 || x.size(0) < 1 || x.is_floating_point()) {
    return absl::InvalidArgumentError(
        "images must be an integer [n, C, H, W] tensor with n >= 1");
  }
  if (x.numel() > 0 &&
      (x.min().item<int64_t>() < 0 || x.max().item<int64_t>() > 255)) {
    return absl::InvalidArgumentError("pixel values must be in 0..255");
  }
  if (o.times < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("times (K) must be >= 1, got ", o.times));
  }
  if (o.replicates < 0 || o.replicates > o.times) {
    return absl::InvalidArgumentError(absl::StrCat(
        "replicates must be 0 (automatic) or in [1, K], got ", o.replicates));
  }
  if (o.discrete_steps < 0) {
    return absl::InvalidArgumentError("discrete_steps must be >= 0");
  }
  if (o.time_proposal != nullptr && o.discrete_steps != 0) {
    // A step i = ceil(t T) would need the proposal's mass over the step,
    // not its density at t; nothing scores discrete time with a proposal.
    return absl::InvalidArgumentError(
        "a time proposal applies to the continuous-time loss only "
        "(discrete_steps must be 0)");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<LikelihoodPlan>> LikelihoodPlan::Create(
    const at::Tensor& x_uint8, const at::Tensor& labels,
    const LikelihoodOptions& options, const ScheduleFn& schedule,
    at::Generator gen) {
  VDM_RETURN_IF_ERROR(CheckInputs(x_uint8, options));
  if (!gen.defined()) return absl::InvalidArgumentError("no generator");
  if (labels.defined() && labels.numel() != x_uint8.size(0)) {
    return absl::InvalidArgumentError("labels must have one entry per image");
  }
  std::unique_ptr<LikelihoodPlan> plan(new LikelihoodPlan(
      x_uint8.to(at::kCPU).to(at::kByte).contiguous(), options));
  if (labels.defined()) {
    plan->labels_ = labels.to(at::kCPU).to(at::kLong).reshape({-1});
  }
  absl::Status drawn;
  try {
    drawn = plan->Draw(schedule, gen);
  } catch (const std::exception& e) {  // c10::Error: no exception leaves
    drawn = absl::InternalError(absl::StrCat("likelihood plan: ", e.what()));
  }
  VDM_RETURN_IF_ERROR(drawn);
  return plan;
}

absl::Status LikelihoodPlan::Draw(const ScheduleFn& schedule,
                                  at::Generator& gen) {
  const int64_t n = num_images(), k = options_.times;
  const bool shared = options_.shared_noise;
  f_ = ToModelSpace(x_);
  // Random numbers, in a fixed order: u, eps, eps0.
  const at::Tensor u =
      at::rand({shared ? 1 : n, ReplicatesFor(options_)}, gen, at::kDouble);
  at::Tensor t = ReplicatedTimes(k, u).expand({n, k}).reshape({-1}).clone();
  importance_ = at::ones({n * k}, at::kDouble);
  if (options_.time_proposal != nullptr) {
    // The layout is in u; each time is F^{-1}(u), weighted by 1 / q(t).
    const TimeProposal& q = *options_.time_proposal;
    double* tp = t.data_ptr<double>();
    double* wp = importance_.data_ptr<double>();
    for (int64_t r = 0; r < n * k; ++r) {
      tp[r] = q.InverseCdf(tp[r]);
      wp[r] = 1.0 / q.Density(tp[r]);
    }
  }
  t_ = t;
  eps_ = at::randn(RowShape(shared ? k : n * k, f_), gen, at::kFloat);
  if (shared) eps_ = eps_.repeat({n, 1, 1, 1});
  const at::Tensor eps0 =
      at::randn(RowShape(shared ? 1 : n, f_), gen, at::kDouble).expand_as(f_);
  beta_ = at::zeros({n * k}, at::kDouble);
  control_ = at::zeros({n * k}, at::kDouble);
  if (options_.discrete_steps == 0) {
    VDM_ASSIGN_OR_RETURN(GammaValues g, Evaluate(schedule, t));
    gamma_ = g.gamma;
    dgamma_ = g.dgamma_dt;
    // The control variate: E ||eps||^2 = D at every t.
    const double dims = static_cast<double>(f_[0].numel());
    control_ = 0.5 * dgamma_ *
               (eps_.to(at::kDouble).pow(2).flatten(1).sum(1) - dims);
    if (options_.time_proposal != nullptr &&
        options_.time_proposal->has_control()) {
      double* bp = beta_.data_ptr<double>();
      const double* tp = t.data_ptr<double>();
      for (int64_t r = 0; r < n * k; ++r) {
        bp[r] = options_.time_proposal->Control(tp[r]);
      }
    }
  } else {
    const double steps = options_.discrete_steps;
    const at::Tensor i = at::ceil(t * steps).clamp(1, steps);
    VDM_ASSIGN_OR_RETURN(
        GammaValues g,
        Evaluate(schedule, at::cat({i / steps, (i - 1) / steps})));
    gamma_ = g.gamma.narrow(0, 0, n * k);
    gamma_s_ = g.gamma.narrow(0, n * k, n * k);
  }
  VDM_ASSIGN_OR_RETURN(GammaValues ends,
                       Evaluate(schedule, at::tensor({0.0, 1.0}, at::kDouble)));
  prior_ = PriorKl(f_.to(at::kDouble), ends.gamma.narrow(0, 1, 1));
  recon_ = ReconstructionNll(x_, ends.gamma.narrow(0, 0, 1), eps0);
  losses_ = at::zeros({n * k}, at::kDouble);
  pixel_ = at::zeros(f_.sizes(), at::kDouble);
  got_.assign(n * k, false);
  return absl::OkStatus();
}

Rows LikelihoodPlan::Next() {
  absl::StatusOr<Rows> all = RowsAt(0, rows());
  return all.ok() ? *std::move(all) : Rows();  // [0, rows()) is always valid
}

absl::StatusOr<Rows> LikelihoodPlan::RowsAt(int64_t begin,
                                            int64_t count) const {
  if (begin < 0 || count < 1 || begin + count > rows()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rows [", begin, ", ", begin + count, ") outside [0, ", rows(), ")"));
  }
  const at::Tensor image =
      at::arange(begin, begin + count, at::kLong).div(options_.times, "floor");
  Rows rows;
  rows.gamma = gamma_.narrow(0, begin, count).to(at::kFloat);
  rows.z = Diffuse(f_.index_select(0, image), rows.gamma,
                   eps_.narrow(0, begin, count));
  if (labels_.defined()) rows.label = labels_.index_select(0, image);
  return rows;
}

void LikelihoodPlan::LossesFor(int64_t begin, const at::Tensor& eps_hat) {
  const int64_t m = eps_hat.size(0);
  const at::Tensor eps = eps_.narrow(0, begin, m).to(at::kDouble);
  const at::Tensor eps_hat64 = eps_hat.to(at::kCPU).to(at::kDouble);
  const at::Tensor loss =
      options_.discrete_steps == 0
          ? DiffusionLossContinuous(eps, eps_hat64, dgamma_.narrow(0, begin, m))
          : DiffusionLossDiscrete(eps, eps_hat64, gamma_.narrow(0, begin, m),
                                  gamma_s_.narrow(0, begin, m),
                                  options_.discrete_steps);
  const at::Tensor controlled =
      loss - beta_.narrow(0, begin, m) * control_.narrow(0, begin, m);
  losses_.narrow(0, begin, m).copy_(controlled);
  // The row's (controlled) loss spread over its elements in proportion to
  // their squared error, accumulated per image for the pixel map, so the
  // map sums to the estimate. (Not the control per element, beta 0.5
  // gamma' (eps_d^2 - 1): that is unbiased per pixel too, but adds noise of
  // the size of a pixel's own loss at low t, where beta is largest.)
  const at::Tensor sq = (eps - eps_hat64).pow(2);
  const at::Tensor per_dim =
      sq * (controlled / sq.flatten(1).sum(1).clamp_min(1e-300))
               .view({m, 1, 1, 1});
  const at::Tensor rows = at::arange(begin, begin + m, at::kLong);
  const at::Tensor weight =
      RowWeights(options_.times, ReplicatesFor(options_))
          .index_select(0, rows.remainder(options_.times)) *
      importance_.narrow(0, begin, m);
  pixel_.index_add_(0, rows.div(options_.times, "floor"),
                    per_dim * weight.view({m, 1, 1, 1}));
}

absl::Status LikelihoodPlan::Consume(int64_t begin, const at::Tensor& eps_hat) {
  if (!eps_hat.defined() || eps_hat.dim() != eps_.dim()) {
    return absl::InvalidArgumentError("eps_hat must be [m, C, H, W]");
  }
  const int64_t m = eps_hat.size(0);
  if (begin < 0 || m < 1 || begin + m > rows() ||
      eps_hat.sizes().slice(1) != eps_.sizes().slice(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "eps_hat rows [", begin, ", ", begin + m, ") do not fit the plan"));
  }
  for (int64_t r = begin; r < begin + m; ++r) {
    if (got_[r]) {
      return absl::InvalidArgumentError(
          absl::StrCat("row ", r, " given twice"));
    }
  }
  try {
    LossesFor(begin, eps_hat);
  } catch (const std::exception& e) {  // c10::Error: no exception leaves
    return absl::InternalError(absl::StrCat("likelihood loss: ", e.what()));
  }
  for (int64_t r = begin; r < begin + m; ++r) got_[r] = true;
  received_ += m;
  return absl::OkStatus();
}

absl::StatusOr<BpdScores> LikelihoodPlan::Result() const {
  if (!complete()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "likelihood plan has ", received_, " of ", rows(), " rows"));
  }
  // Importance-weighted losses: each replicate's mean of L / q estimates
  // the integral without bias.
  const at::Tensor weighted = row_losses() * row_importance();
  const ReplicatedEstimate e =
      EstimateFromReplicates(weighted, ReplicatesFor(options_));
  const int64_t dims = f_[0].numel();
  BpdScores s;
  s.prior = NatsToBpd(prior_, dims);
  s.recon = NatsToBpd(recon_, dims);
  s.diffusion = NatsToBpd(e.mean, dims);
  s.stderr_bpd = NatsToBpd(at::sqrt(e.variance), dims);
  s.bpd = s.prior + s.recon + s.diffusion;
  s.band = NatsToBpd(BandProfile(weighted, row_times(), kBands,
                                 RowWeights(options_.times,
                                            ReplicatesFor(options_))),
                     dims);
  s.pixel_bits = (pixel_ / std::log(2.0)).sum(1);
  return s;
}

at::Tensor BandProfile(const at::Tensor& losses, const at::Tensor& times,
                       int bands, const at::Tensor& weights) {
  const int64_t n = losses.size(0);
  const at::Tensor band =
      (times * bands).floor().clamp(0, bands - 1).to(at::kLong);
  at::Tensor out = at::zeros({n, bands}, losses.options());
  const at::Tensor w = weights.to(losses.dtype());
  out.scatter_add_(1, band, losses * (w.dim() == 1 ? w.view({1, -1}) : w));
  return out;
}

at::Tensor RowWeights(int times, int replicates) {
  const at::Tensor k = at::arange(times, at::kLong);
  const at::Tensor r = k.remainder(replicates);
  const at::Tensor count =
      (times - r + replicates - 1).div(replicates, "floor").to(at::kDouble);
  return 1.0 / (count * replicates);
}

int ReplicatesFor(const LikelihoodOptions& options) {
  if (options.replicates > 0) return options.replicates;
  return std::max(1, std::min(options.times, std::max(2, options.times / 16)));
}

at::Tensor ReplicatedTimes(int times, const at::Tensor& u) {
  const int64_t g = u.size(1);
  const at::Tensor k = at::arange(times, at::kLong);
  const at::Tensor r = k.remainder(g);
  // n_r = ceil((K - r) / G) points in replicate r.
  const at::Tensor count = (times - r + g - 1).div(g, "floor").to(at::kDouble);
  const at::Tensor j = k.div(g, "floor").to(at::kDouble);
  return (j + u.to(at::kDouble).index_select(1, r)) / count;
}

ReplicatedEstimate EstimateFromReplicates(const at::Tensor& losses,
                                          int replicates) {
  const int64_t n = losses.size(0), k = losses.size(1), g = replicates;
  // Replicate means [n, G]: row k belongs to replicate k mod G.
  const at::Tensor r = at::arange(k, at::kLong).remainder(g);
  at::Tensor means = at::zeros({n, g}, losses.options());
  means.index_add_(1, r, losses);
  means = means / at::bincount(r, {}, g).to(losses.scalar_type());
  ReplicatedEstimate e;
  e.mean = means.mean(1);
  e.variance = g < 2 ? at::full({n}, std::numeric_limits<double>::quiet_NaN(),
                                losses.options())
                     : means.var(1) / static_cast<double>(g);
  return e;
}

absl::StatusOr<BpdScores> ScoreImages(Denoiser& model,
                                      const at::Tensor& x_uint8,
                                      const ScoreOptions& options) {
  if (options.batch_rows < 1) {
    return absl::InvalidArgumentError("batch_rows must be >= 1");
  }
  const int64_t n = x_uint8.defined() && x_uint8.dim() > 0 ? x_uint8.size(0) : 0;
  const at::Tensor labels =
      options.labels.defined()
          ? options.labels
          : at::full({n}, int64_t{model.num_classes()}, at::kLong);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<LikelihoodPlan> plan,
                       LikelihoodPlan::Create(x_uint8, labels,
                                              options.likelihood,
                                              ScheduleOf(model), gen));
  for (int64_t begin = 0; begin < plan->rows(); begin += options.batch_rows) {
    if (options.stop != nullptr && options.stop->load()) {
      return absl::CancelledError("scoring interrupted");
    }
    const int64_t m = std::min(options.batch_rows, plan->rows() - begin);
    VDM_ASSIGN_OR_RETURN(const Rows rows, plan->RowsAt(begin, m));
    VDM_ASSIGN_OR_RETURN(at::Tensor eps_hat, Evaluate(model, rows));
    VDM_RETURN_IF_ERROR(plan->Consume(begin, eps_hat));
  }
  return plan->Result();
}

}  // namespace vdm
