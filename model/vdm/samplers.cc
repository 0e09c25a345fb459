#include "model/vdm/samplers.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// DDIM(eta) (eta = 1: DDPM ancestral), via DdimStep (diffusion.h).
class DdimSampler : public Sampler {
 public:
  DdimSampler(at::Tensor z1, at::Tensor gammas, at::Generator gen, double eta)
      : Sampler(std::move(z1), std::move(gammas), std::move(gen)), eta_(eta) {}

 private:
  void Advance(const at::Tensor& eps_hat) override {
    const at::Tensor gt = GammaAt(step_), gs = GammaAt(step_ + 1);
    x_hat_ = PredictX(z_, gt, eps_hat);
    const at::Tensor xi = eta_ > 0 ? Noise() : at::zeros_like(z_);
    z_ = DdimStep(z_, eps_hat, gt, gs, at::full({1}, eta_, z_.options()), xi);
    ++step_;
  }

  const double eta_;
};

// The reverse SDE of the variance-preserving forward process, written with
// gamma as the time variable: f dt = -sigma^2 / 2 dgamma, g^2 dt = sigma^2
// dgamma, score = -eps_hat / sigma. One Euler-Maruyama step from gamma_t down
// to gamma_s, h = gamma_t - gamma_s > 0:
//   z_s = z_t + h (sigma_t^2 z_t / 2 - sigma_t eps_hat) + sigma_t sqrt(h) xi.
class EulerMaruyamaSampler : public Sampler {
 public:
  EulerMaruyamaSampler(at::Tensor z1, at::Tensor gammas, at::Generator gen)
      : Sampler(std::move(z1), std::move(gammas), std::move(gen)) {}

 private:
  void Advance(const at::Tensor& eps_hat) override {
    const at::Tensor gt = GammaAt(step_), gs = GammaAt(step_ + 1);
    x_hat_ = PredictX(z_, gt, eps_hat);
    const at::Tensor h = gt - gs;
    const at::Tensor sigma2 = SigmaSquared(gt);
    const at::Tensor sigma = at::sqrt(sigma2);
    z_ = z_ + h * (0.5 * sigma2 * z_ - sigma * eps_hat) +
         sigma * at::sqrt(h) * Noise();
    ++step_;
  }
};

// The probability-flow ODE dz/dgamma = (sigma eps_hat - sigma^2 z) / 2,
// integrated from gamma(1) to gamma(0) with Heun's method (explicit
// trapezoid): two network evaluations per step, the second at the Euler
// predictor z' = z_t + (gamma_s - gamma_t) d1.
class HeunSampler : public Sampler {
 public:
  HeunSampler(at::Tensor z1, at::Tensor gammas, at::Generator gen)
      : Sampler(std::move(z1), std::move(gammas), std::move(gen)) {}

  Rows Next() const override {
    if (!predicted_.defined()) return Sampler::Next();
    Rows rows;
    rows.z = predicted_.to(at::kFloat);
    rows.gamma = GammaAt(step_ + 1).to(at::kFloat).expand({z_.size(0)});
    return rows;
  }

 private:
  static at::Tensor Slope(const at::Tensor& z, const at::Tensor& gamma,
                          const at::Tensor& eps_hat) {
    const at::Tensor sigma2 = SigmaSquared(gamma);
    return 0.5 * (at::sqrt(sigma2) * eps_hat - sigma2 * z);
  }

  void Advance(const at::Tensor& eps_hat) override {
    const at::Tensor gt = GammaAt(step_), gs = GammaAt(step_ + 1);
    const at::Tensor delta = gs - gt;
    if (!predicted_.defined()) {
      x_hat_ = PredictX(z_, gt, eps_hat);
      slope_ = Slope(z_, gt, eps_hat);
      predicted_ = z_ + delta * slope_;
      return;
    }
    z_ = z_ + 0.5 * delta * (slope_ + Slope(predicted_, gs, eps_hat));
    predicted_ = at::Tensor();
    slope_ = at::Tensor();
    ++step_;
  }

  at::Tensor slope_;      // d1 of the current step
  at::Tensor predicted_;  // Euler predictor; defined between the two stages
};

// DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep solver of the
// probability-flow ODE in lambda = -gamma / 2. With h = lambda_s - lambda_t:
//   z_s = (sigma_s / sigma_t) z_t - alpha_s expm1(-h) D,
// D = x_hat on the first step, else the second-order combination
// (1 + 1 / 2r) x_hat - (1 / 2r) x_hat_prev, r = h_prev / h.
class DpmSolver2MSampler : public Sampler {
 public:
  DpmSolver2MSampler(at::Tensor z1, at::Tensor gammas, at::Generator gen)
      : Sampler(std::move(z1), std::move(gammas), std::move(gen)) {}

  // The second-order update uses the previous step's x_hat: a jump back
  // would pair it with the wrong step (multistep in the sampler table).

 private:
  void Advance(const at::Tensor& eps_hat) override {
    const at::Tensor gt = GammaAt(step_), gs = GammaAt(step_ + 1);
    const at::Tensor h = 0.5 * (gt - gs);
    x_hat_ = PredictX(z_, gt, eps_hat);
    at::Tensor d = x_hat_;
    if (previous_x_.defined()) {
      const at::Tensor half_inv_r = 0.5 * h / previous_h_;
      d = (1.0 + half_inv_r) * x_hat_ - half_inv_r * previous_x_;
    }
    const at::Tensor ratio = at::sqrt(SigmaSquared(gs) / SigmaSquared(gt));
    z_ = ratio * z_ - at::sqrt(AlphaSquared(gs)) * at::expm1(-h) * d;
    previous_x_ = x_hat_;
    previous_h_ = h;
    ++step_;
  }

  at::Tensor previous_x_;  // x_hat of the previous step
  at::Tensor previous_h_;  // its lambda increment
};

// The gamma grid from gamma(1) down to gamma(0), [steps + 1] in `dtype`.
absl::StatusOr<at::Tensor> MakeGrid(const SamplerConfig& config,
                                    const ScheduleFn& schedule,
                                    at::ScalarType dtype) {
  const int n = config.steps;
  at::Tensor gammas;
  if (config.grid == TimeGrid::kUniformT) {
    VDM_ASSIGN_OR_RETURN(
        GammaValues g,
        schedule(at::linspace(config.t_start, 0.0, n + 1, at::kFloat)));
    gammas = g.gamma;
  } else {
    VDM_ASSIGN_OR_RETURN(
        GammaValues g,
        schedule(at::tensor({static_cast<float>(config.t_start), 0.0f},
                            at::kFloat)));
    const at::Tensor ends = g.gamma.to(at::kCPU).to(at::kDouble);
    if (ends.numel() != 2) {
      return absl::InvalidArgumentError("schedule returned a wrong shape");
    }
    gammas = at::linspace(ends[0].item<double>(), ends[1].item<double>(), n + 1,
                          at::kDouble);
  }
  gammas = gammas.to(at::kCPU).to(dtype).reshape({-1});
  if (gammas.numel() != n + 1 || !at::isfinite(gammas).all().item<bool>()) {
    return absl::InvalidArgumentError(
        "schedule gamma(t) returned a wrong shape or non-finite values");
  }
  if (!(gammas.narrow(0, 0, n) > gammas.narrow(0, 1, n)).all().item<bool>()) {
    return absl::InvalidArgumentError(
        "schedule gamma(t) must increase strictly with t");
  }
  return gammas;
}

}  // namespace

Sampler::Sampler(at::Tensor z1, at::Tensor gammas, at::Generator gen)
    : z_(std::move(z1)), gammas_(std::move(gammas)), gen_(std::move(gen)) {}

Rows Sampler::Next() const {
  Rows rows;
  rows.z = z_.to(at::kFloat);
  rows.gamma = GammaAt(step_).to(at::kFloat).expand({z_.size(0)});
  return rows;
}

absl::Status Sampler::Consume(const at::Tensor& eps_hat) {
  if (done()) return absl::FailedPreconditionError("sampler is done");
  if (!eps_hat.defined() || eps_hat.sizes() != z_.sizes()) {
    return absl::InvalidArgumentError(
        "eps_hat must have the shape of the sampler's rows");
  }
  ++evaluations_;
  try {
    Advance(eps_hat.to(at::kCPU).to(z_.scalar_type()));
  } catch (const std::exception& e) {  // c10::Error: no exception leaves
    return absl::InternalError(absl::StrCat("sampler step failed: ", e.what()));
  }
  return absl::OkStatus();
}

void Sampler::Blend(const at::Tensor& known, const at::Tensor& z_known) {
  z_ = at::where(known, z_known.to(z_.scalar_type()), z_);
}

void Sampler::JumpBack(const at::Tensor& eps) {
  // Callers check step_ > 0 and that the sampler is not multistep.
  const at::Tensor gt = GammaAt(step_ - 1), gs = GammaAt(step_);
  const at::Tensor alpha_ts = at::sqrt(AlphaSquared(gt) / AlphaSquared(gs));
  const at::Tensor sigma_ts =
      at::sqrt(-at::expm1(gs - gt) * SigmaSquared(gt));
  z_ = alpha_ts * z_ + sigma_ts * eps.to(z_.scalar_type());
  --step_;
}

at::Tensor Sampler::Images() const {
  return DecodeMostLikely(z_, GammaAt(step_));
}

at::Tensor Sampler::Noise() const {
  return at::randn(z_.sizes(), gen_, z_.scalar_type());
}

absl::StatusOr<std::unique_ptr<Sampler>> MakeSampler(
    const SamplerConfig& config, const at::Tensor& z1,
    const ScheduleFn& schedule, at::Generator gen) {
  if (config.steps < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("steps must be >= 1, got ", config.steps));
  }
  if (TraitsOf(config.type).takes_eta &&
      !(config.eta >= 0.0 && config.eta <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("eta must be in [0, 1], got ", config.eta));
  }
  if (!(config.t_start > 0.0 && config.t_start <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("t_start must be in (0, 1], got ", config.t_start));
  }
  if (!z1.defined() || z1.dim() != 4 || !z1.is_floating_point()) {
    return absl::InvalidArgumentError("z1 must be a float [n, C, H, W] tensor");
  }
  if (!gen.defined()) return absl::InvalidArgumentError("no generator");
  const at::Tensor z = z1.to(at::kCPU).clone();
  absl::StatusOr<at::Tensor> grid;
  try {
    grid = MakeGrid(config, schedule, z.scalar_type());
  } catch (const std::exception& e) {
    grid = absl::InternalError(absl::StrCat("sampler grid: ", e.what()));
  }
  if (!grid.ok()) return grid.status();
  const at::Tensor gammas = *std::move(grid);
  std::unique_ptr<Sampler> s;
  switch (config.type) {
    case SamplerType::kDdim:
    case SamplerType::kDdpm: {
      const double eta = config.type == SamplerType::kDdpm ? 1.0 : config.eta;
      s = std::make_unique<DdimSampler>(z, gammas, gen, eta);
      break;
    }
    case SamplerType::kEulerMaruyama:
      s = std::make_unique<EulerMaruyamaSampler>(z, gammas, gen);
      break;
    case SamplerType::kHeun:
      s = std::make_unique<HeunSampler>(z, gammas, gen);
      break;
    case SamplerType::kDpmSolver2M:
      s = std::make_unique<DpmSolver2MSampler>(z, gammas, gen);
      break;
  }
  if (s == nullptr) return absl::InvalidArgumentError("unknown sampler type");
  return s;
}

absl::StatusOr<double> EditStartTime(const SampleEdit& edit,
                                     const ScheduleFn& schedule) {
  const double s = edit.strength;
  if (!(s > 0.0 && s <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("strength must be in (0, 1], got ", s));
  }
  if (edit.strength_scale == SampleEdit::StrengthScale::kTime || s == 1.0) {
    return s;
  }
  // gamma = logit(sigma^2); the schedule is increasing in t.
  const double target = std::log(s) - std::log1p(-s);
  constexpr int kPoints = 257;
  double lo = 0.0, hi = 1.0;
  for (int round = 0; round < 2; ++round) {
    VDM_ASSIGN_OR_RETURN(
        GammaValues g, schedule(at::linspace(lo, hi, kPoints, at::kDouble)
                                    .to(at::kFloat)));
    const at::Tensor gamma = g.gamma.to(at::kCPU).to(at::kDouble).reshape({-1});
    if (gamma.numel() != kPoints || !at::isfinite(gamma).all().item<bool>()) {
      return absl::InvalidArgumentError(
          "schedule gamma(t) returned a wrong shape or non-finite values");
    }
    const double* v = gamma.data_ptr<double>();
    if (round == 0 && target <= v[0]) return kMinEditStartTime;
    if (round == 0 && target >= v[kPoints - 1]) return 1.0;
    // The first grid point at or above the target (v is increasing).
    int k = 1;
    while (k < kPoints - 1 && v[k] < target) ++k;
    const double step = (hi - lo) / (kPoints - 1);
    const double t0 = lo + (k - 1) * step, t1 = lo + k * step;
    if (round == 1) {
      const double span = v[k] - v[k - 1];
      const double f = span > 0.0 ? (target - v[k - 1]) / span : 1.0;
      const double t = t0 + std::clamp(f, 0.0, 1.0) * (t1 - t0);
      return std::clamp(t, kMinEditStartTime, 1.0);
    }
    lo = t0;
    hi = t1;
  }
  return absl::InternalError("unreachable");
}

namespace {

// SamplingPlan::Create's checks of the request alone, before any tensor
// work, in the order it reports them.
absl::Status CheckPlanRequest(const SamplerConfig& sampler, int64_t num_images,
                              const Conditioning& c, int num_classes,
                              const SampleEdit& edit) {
  if (num_images < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_images must be >= 1, got ", num_images));
  }
  for (int l : {c.label, c.negative_label}) {
    if (l >= num_classes && num_classes > 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "label ", l, " is out of range [0, ", num_classes, ")"));
    }
  }
  const bool has_reference = edit.reference.defined();
  if ((edit.known.defined() || edit.strength < 1.0) && !has_reference) {
    return absl::InvalidArgumentError(
        "image-to-image and inpainting need a reference image");
  }
  if (!(edit.strength > 0.0 && edit.strength <= 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("strength must be in (0, 1], got ", edit.strength));
  }
  if (sampler.resample_rounds < 0 ||
      (sampler.resample_rounds > 0 && !edit.known.defined())) {
    return absl::InvalidArgumentError(absl::StrCat(
        "resample_rounds must be >= 0 and needs an inpainting mask, got ",
        sampler.resample_rounds));
  }
  if (sampler.resample_rounds > 0 && TraitsOf(sampler.type).multistep) {
    return absl::InvalidArgumentError(absl::StrCat(
        "resample_rounds: the ", SamplerName(sampler.type),
        " sampler keeps a history of steps and cannot jump back; use one of ",
        SamplerNameList(", ", [](const SamplerTraits& t) { return !t.multistep; })));
  }
  if (edit.z1.defined() && has_reference) {
    return absl::InvalidArgumentError(
        "a given latent z1 cannot be combined with an edit");
  }
  return absl::OkStatus();
}

// The label of each of the num_images images, [n] int64: `labels` when
// defined (then every image has one: c->label becomes 0), else the
// conditioning's row label. May throw (c10::Error).
absl::StatusOr<at::Tensor> ImageLabels(const at::Tensor& labels,
                                       int64_t num_images, int num_classes,
                                       Conditioning* c) {
  if (!labels.defined()) {
    return at::full({num_images}, RowLabel(*c, num_classes), at::kLong);
  }
  const at::Tensor l = labels.to(at::kCPU).to(at::kLong).reshape({-1});
  if (l.numel() != num_images || num_classes == 0 ||
      (l.numel() > 0 && (l.min().item<int64_t>() < 0 ||
                         l.max().item<int64_t>() >= num_classes))) {
    return absl::InvalidArgumentError(absl::StrCat(
        "labels must be ", num_images, " values in [0, ", num_classes, ")"));
  }
  c->label = 0;  // every image has a label
  return l;
}

// The trajectory's start, float [dims]: noise drawn from `gen` (drawn even
// when it is not used, so the sampler's draws do not depend on edit.z1), or
// the given latent edit.z1. May throw (c10::Error).
absl::StatusOr<at::Tensor> StartLatent(const std::vector<int64_t>& dims,
                                       at::Generator& gen,
                                       const SampleEdit& edit) {
  at::Tensor z1 = at::randn(dims, gen, at::kFloat);
  if (!edit.z1.defined()) return z1;
  if (edit.z1.sizes() != at::IntArrayRef(dims) ||
      !edit.z1.is_floating_point()) {
    return absl::InvalidArgumentError(
        "the latent z1 must be float [num_images, C, H, W] of the model's "
        "shape");
  }
  return edit.z1.to(at::kCPU).to(at::kFloat);
}

// An edit's tensors expanded to [dims]: the reference image (uint8), it in
// model space, and the known-pixel mask (bool; undefined without
// inpainting). May throw (c10::Error).
struct EditTensors {
  at::Tensor reference, f, known;
};

absl::StatusOr<EditTensors> ExpandEdit(const SampleEdit& edit,
                                       const ImageShape& shape,
                                       const std::vector<int64_t>& dims) {
  const at::Tensor ref = edit.reference.to(at::kCPU);
  if (ref.dim() != 4 || ref.size(0) != 1 || ref.size(1) != shape.channels ||
      ref.size(2) != shape.height || ref.size(3) != shape.width) {
    return absl::InvalidArgumentError(
        "the reference image must be uint8 [1, C, H, W] of the model's shape");
  }
  EditTensors e;
  e.reference = ref.to(at::kByte).expand(dims).contiguous();
  e.f = ToModelSpace(e.reference);
  if (edit.known.defined()) {
    e.known = edit.known.to(at::kCPU).to(at::kBool).expand(dims).contiguous();
  }
  return e;
}

}  // namespace

absl::StatusOr<std::unique_ptr<SamplingPlan>> SamplingPlan::Create(
    const SamplerConfig& sampler, int64_t num_images,
    const Conditioning& conditioning, const ImageShape& shape,
    int num_classes, uint64_t seed, const ScheduleFn& schedule,
    const at::Tensor& labels, const SampleEdit& edit) {
  VDM_RETURN_IF_ERROR(
      CheckPlanRequest(sampler, num_images, conditioning, num_classes, edit));
  Conditioning c = conditioning;
  std::unique_ptr<SamplingPlan> plan(new SamplingPlan());
  plan->n_ = num_images;
  plan->rounds_ = sampler.resample_rounds;
  plan->second_label_ = SecondRowLabel(c, num_classes);
  plan->scale_ = c.guidance_scale;
  plan->replace_gen_ =
      at::make_generator<at::CPUGeneratorImpl>(seed ^ 0x9E3779B97F4A7C15ull);
  try {
    VDM_ASSIGN_OR_RETURN(plan->labels_,
                         ImageLabels(labels, num_images, num_classes, &c));
    plan->guided_ = IsGuided(c, num_classes);
    const std::vector<int64_t> dims = {num_images, shape.channels,
                                       shape.height, shape.width};
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    VDM_ASSIGN_OR_RETURN(at::Tensor z1, StartLatent(dims, gen, edit));
    SamplerConfig config = sampler;
    if (edit.reference.defined()) {
      VDM_ASSIGN_OR_RETURN(EditTensors e, ExpandEdit(edit, shape, dims));
      plan->reference_ = e.reference;
      plan->f_ = e.f;
      plan->known_ = e.known;
      if (edit.strength < 1.0) {
        // SDEdit: start from the reference noised to the strength's time.
        VDM_ASSIGN_OR_RETURN(config.t_start, EditStartTime(edit, schedule));
        VDM_ASSIGN_OR_RETURN(
            GammaValues g,
            schedule(at::full({1}, static_cast<float>(config.t_start), at::kFloat)));
        z1 = Diffuse(plan->f_, g.gamma.to(at::kCPU).to(at::kFloat), z1);
      }
    }
    VDM_ASSIGN_OR_RETURN(plan->sampler_,
                         MakeSampler(config, z1, schedule, gen));
    if (plan->known_.defined()) plan->ReplaceKnown();
  } catch (const std::exception& e) {  // c10::Error: no exception leaves
    return absl::InternalError(absl::StrCat("sampling plan: ", e.what()));
  }
  return plan;
}

void SamplingPlan::ReplaceKnown() {
  // The replacement method: the known pixels become the reference noised to
  // the sampler's current time, with fresh noise of the plan's own.
  const at::Tensor gamma = sampler_->gammas().narrow(0, sampler_->step(), 1);
  const at::Tensor eps = at::randn(f_.sizes(), replace_gen_, at::kFloat);
  sampler_->Blend(known_, Diffuse(f_, gamma.to(at::kFloat), eps));
}

at::Tensor SamplingPlan::Images() const {
  at::Tensor images = sampler_->Images();
  if (known_.defined()) images = at::where(known_, reference_, images);
  return images;
}

Rows SamplingPlan::Next() {
  Rows rows = sampler_->Next();
  rows.label = labels_;
  if (!guided_) return rows;
  Rows uncond = rows;
  uncond.label = at::full({n_}, second_label_, at::kLong);
  return Rows::Cat({rows, uncond});
}

absl::Status SamplingPlan::Consume(const at::Tensor& eps_hat) {
  if (!eps_hat.defined() || eps_hat.dim() < 1 ||
      eps_hat.size(0) != rows_per_evaluation()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "eps_hat must have ", rows_per_evaluation(), " rows"));
  }
  if (!guided_) return Advance(eps_hat);
  at::Tensor guided;
  try {
    const at::Tensor eps = eps_hat.to(at::kCPU);
    guided = Guide(eps.narrow(0, n_, n_), eps.narrow(0, 0, n_),
                   at::full({1}, scale_, eps.options()));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("guidance: ", e.what()));
  }
  return Advance(guided);
}

absl::Status SamplingPlan::Advance(const at::Tensor& eps_hat) {
  const int before = sampler_->step();
  VDM_RETURN_IF_ERROR(sampler_->Consume(eps_hat));
  if (known_.defined() && sampler_->step() > before) {
    try {
      ReplaceKnown();
      // RePaint: jump back to the step's start and redo it, rounds_ times.
      if (round_ < rounds_) {
        sampler_->JumpBack(
            at::randn(f_.sizes(), replace_gen_, at::kFloat));
        ++round_;
      } else {
        round_ = 0;
      }
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("inpainting: ", e.what()));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<EncodePlan>> EncodePlan::Create(
    const at::Tensor& images, const SamplerConfig& grid, int label,
    const ImageShape& shape, int num_classes, const ScheduleFn& schedule) {
  if (grid.steps < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("steps must be >= 1, got ", grid.steps));
  }
  if (label >= 0 && label >= num_classes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "label ", label, " is out of range [0, ", num_classes, ")"));
  }
  if (!images.defined() || images.dim() != 4 || images.size(0) < 1 ||
      images.size(1) != shape.channels || images.size(2) != shape.height ||
      images.size(3) != shape.width) {
    return absl::InvalidArgumentError(
        "the images must be uint8 [n, C, H, W] of the model's shape, n >= 1");
  }
  std::unique_ptr<EncodePlan> plan(new EncodePlan());
  try {
    const int64_t n = images.size(0);
    plan->labels_ = at::full(
        {n}, label >= 0 && num_classes > 0 ? label : num_classes, at::kLong);
    SamplerConfig config = grid;
    config.t_start = 1.0;
    VDM_ASSIGN_OR_RETURN(at::Tensor down,
                         MakeGrid(config, schedule, at::kFloat));
    const at::Tensor up = down.flip({0}).contiguous();
    // z_0 = alpha_0 f: the mean of q(z_0 | x), the point the decoder maps
    // back to x.
    const at::Tensor f = ToModelSpace(images.to(at::kCPU));
    const at::Tensor z0 = at::sqrt(AlphaSquared(up.narrow(0, 0, 1))) * f;
    plan->sampler_ = std::make_unique<DdimSampler>(
        z0, up, at::make_generator<at::CPUGeneratorImpl>(0), 0.0);
  } catch (const std::exception& e) {  // c10::Error: no exception leaves
    return absl::InternalError(absl::StrCat("encoding plan: ", e.what()));
  }
  return plan;
}

Rows EncodePlan::Next() {
  Rows rows = sampler_->Next();
  rows.label = labels_;
  return rows;
}

absl::Status EncodePlan::Consume(const at::Tensor& eps_hat) {
  return sampler_->Consume(eps_hat);
}

absl::StatusOr<at::Tensor> EncodeImages(Denoiser& model,
                                        const at::Tensor& images,
                                        const SamplerConfig& grid, int label) {
  VDM_ASSIGN_OR_RETURN(
      std::unique_ptr<EncodePlan> plan,
      EncodePlan::Create(images, grid, label, model.shape(),
                         model.num_classes(), ScheduleOf(model)));
  while (!plan->done()) {
    VDM_ASSIGN_OR_RETURN(at::Tensor eps, Evaluate(model, plan->Next()));
    VDM_RETURN_IF_ERROR(plan->Consume(eps));
  }
  return plan->z();
}

absl::StatusOr<at::Tensor> SampleImages(Denoiser& model,
                                        const SampleOptions& options) {
  VDM_ASSIGN_OR_RETURN(
      std::unique_ptr<SamplingPlan> plan,
      SamplingPlan::Create(options.sampler, options.num_images,
                           options.conditioning, model.shape(),
                           model.num_classes(), options.seed,
                           ScheduleOf(model), options.labels, options.edit));
  while (!plan->done()) {
    if (options.stop != nullptr && options.stop->load()) {
      return absl::CancelledError("sampling interrupted");
    }
    VDM_ASSIGN_OR_RETURN(at::Tensor eps, Evaluate(model, plan->Next()));
    VDM_RETURN_IF_ERROR(plan->Consume(eps));
  }
  return plan->Images();
}

}  // namespace vdm
