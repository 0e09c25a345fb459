#include "server/tasks.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

double Seconds(absl::Duration d) { return absl::ToDoubleSeconds(d); }

// uint8 [n, C, H, W] -> n images.
std::vector<Image8> ToImages(const at::Tensor& pixels_uint8) {
  const at::Tensor pixels = pixels_uint8.contiguous();
  const int64_t per_image = pixels[0].numel();
  std::vector<Image8> images;
  for (int64_t i = 0; i < pixels.size(0); ++i) {
    Image8 image{static_cast<int>(pixels.size(1)),
                 static_cast<int>(pixels.size(2)),
                 static_cast<int>(pixels.size(3)), {}};
    const uint8_t* p = pixels[i].data_ptr<uint8_t>();
    image.pixels.assign(p, p + per_image);
    images.push_back(std::move(image));
  }
  return images;
}

// ---------------------------------------------------------------------------
// Sampling: DDIM(eta) / DDPM on a uniform time grid from t = 1 to t = 0,
// with classifier-free guidance as a pair of rows per image.
class SampleTask : public Task {
 public:
  SampleTask(const SampleJob& job, RequestControl control,
             Engine::SampleCallback done, absl::Time arrival)
      : Task(std::move(control), arrival), job_(job), done_cb_(std::move(done)) {}

  bool is_score() const override { return false; }
  const char* method() const override { return "Sample"; }
  int64_t remaining_rows() const override {
    return (job_.steps - step_) * rows_per_step_ - cursor_;
  }

  absl::Status Start(Denoiser& model) override {
    const ImageShape s = model.shape();
    const int64_t n = job_.num_images;
    const int classes = model.num_classes();
    guided_ = job_.label >= 0 && classes > 0 && job_.guidance_scale != 1.0f;
    cond_label_ = (job_.label >= 0 && classes > 0) ? job_.label : classes;
    uncond_label_ = classes;
    rows_per_step_ = guided_ ? 2 * n : n;
    gen_ = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    const at::Tensor grid = at::linspace(1.0, 0.0, job_.steps + 1, at::kFloat);
    VDM_ASSIGN_OR_RETURN(GammaValues g, model.Gamma(grid));
    gammas_ = g.gamma.to(at::kCPU).to(at::kFloat);
    z_ = at::randn({n, s.channels, s.height, s.width}, gen_, at::kFloat);
    eps_ = at::empty({rows_per_step_, s.channels, s.height, s.width}, at::kFloat);
    eta_ = job_.sampler == SamplerKind::kDdpm ? 1.0f : job_.eta;
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override {
    const int64_t m = std::min(max_rows, rows_per_step_ - cursor_);
    if (m <= 0 || done()) return {};
    const int64_t n = job_.num_images;
    const at::Tensor r = at::arange(cursor_, cursor_ + m, at::kLong);
    Rows rows;
    rows.z = z_.index_select(0, r.remainder(n));
    rows.gamma = at::full({m}, gammas_[step_].item<float>(), at::kFloat);
    // Rows [0, n) carry the request's label, rows [n, 2n) "no label".
    rows.label = at::where(r < n, at::full({m}, cond_label_, at::kLong),
                           at::full({m}, uncond_label_, at::kLong));
    taken_offset_ = cursor_;
    cursor_ += m;
    return rows;
  }

  absl::Status Give(const at::Tensor& eps_hat) override {
    eps_.narrow(0, taken_offset_, eps_hat.size(0)).copy_(eps_hat);
    received_ += eps_hat.size(0);
    if (received_ == rows_per_step_) Advance();
    return absl::OkStatus();
  }

  bool done() const override { return step_ >= job_.steps; }

  void Finish(absl::Status error) override {
    if (!error.ok()) return done_cb_(error);
    SampleResult result;
    result.images = ToImages(DecodeMostLikely(z_, gammas_[job_.steps]));
    FillTimes(&result);
    done_cb_(std::move(result));
  }

 private:
  void Advance() {
    const int64_t n = job_.num_images;
    at::Tensor eps_hat = eps_;
    if (guided_) {
      eps_hat = Guide(eps_.narrow(0, n, n), eps_.narrow(0, 0, n),
                      at::full({1}, job_.guidance_scale, at::kFloat));
    }
    const at::Tensor gt = gammas_[step_].reshape({1});
    const at::Tensor gs = gammas_[step_ + 1].reshape({1});
    const at::Tensor xi = eta_ > 0 ? at::randn(z_.sizes(), gen_, at::kFloat)
                                   : at::zeros_like(z_);
    if (job_.progress) Report(eps_hat);
    z_ = DdimStep(z_, eps_hat, gt, gs, at::full({1}, eta_, at::kFloat), xi);
    ++step_;
    cursor_ = 0;
    received_ = 0;
  }

  // Progress after the step being finished; previews are x_hat at this step.
  void Report(const at::Tensor& eps_hat) const {
    SampleProgress progress;
    progress.step = step_ + 1;
    progress.total_steps = job_.steps;
    const int every = job_.preview_every;
    if (every > 0 && progress.step % every == 0 &&
        progress.step < job_.steps) {
      const at::Tensor x_hat = PredictX(z_, gammas_[step_].reshape({1}), eps_hat);
      progress.previews = ToImages(ToUint8(x_hat));
    }
    job_.progress(std::move(progress));
  }

  template <typename R>
  void FillTimes(R* result) const {
    result->network_evaluations = evaluations();
    result->queue_seconds = Seconds(first_forward() - arrival());
    result->compute_seconds = Seconds(absl::Now() - first_forward());
  }

  const SampleJob job_;
  Engine::SampleCallback done_cb_;
  bool guided_ = false;
  int64_t cond_label_ = 0, uncond_label_ = 0;
  int64_t rows_per_step_ = 0;
  float eta_ = 0;
  at::Generator gen_;
  at::Tensor gammas_;  // [steps + 1], gamma at t = 1 ... 0
  at::Tensor z_;       // [n, C, H, W]
  at::Tensor eps_;     // [rows_per_step, C, H, W] network outputs of the step
  int step_ = 0;
  int64_t cursor_ = 0, received_ = 0, taken_offset_ = 0;
};

// ---------------------------------------------------------------------------
// Scoring: per image, prior + reconstruction (no network) + the continuous-
// time diffusion term at K stratified times t_k = (k + u) / K.
class ScoreTask : public Task {
 public:
  ScoreTask(ScoreJob job, RequestControl control, Engine::ScoreCallback done,
            absl::Time arrival)
      : Task(std::move(control), arrival),
        job_(std::move(job)),
        done_cb_(std::move(done)) {}

  bool is_score() const override { return true; }
  const char* method() const override { return "ScoreBPD"; }
  int64_t remaining_rows() const override {
    return static_cast<int64_t>(job_.images.size()) * job_.timesteps - cursor_;
  }

  absl::Status Start(Denoiser& model) override {
    const ImageShape s = model.shape();
    const int64_t n = static_cast<int64_t>(job_.images.size());
    const int64_t k = job_.timesteps;
    dims_ = s.dims();
    x_ = at::empty({n, s.channels, s.height, s.width}, at::kByte);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(x_[i].data_ptr<uint8_t>(), job_.images[i].pixels.data(),
                  dims_);
    }
    f_ = ToModelSpace(x_);
    label_ = job_.label >= 0 ? job_.label : model.num_classes();
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    const bool shared = job_.shared_noise;
    const at::Tensor u = at::rand({shared ? 1 : n, 1}, gen, at::kDouble);
    const at::Tensor t =
        ((at::arange(k, at::kDouble).reshape({1, k}) + u) / k).expand({n, k});
    VDM_ASSIGN_OR_RETURN(GammaValues g, model.Gamma(t.reshape({-1}).to(at::kFloat)));
    gamma_ = g.gamma.to(at::kCPU);
    dgamma_ = g.dgamma_dt.to(at::kCPU);
    const at::IntArrayRef img = f_.sizes().slice(1);
    std::vector<int64_t> eps_shape = {shared ? k : n * k};
    eps_shape.insert(eps_shape.end(), img.begin(), img.end());
    eps_ = at::randn(eps_shape, gen, at::kFloat);
    if (shared) eps_ = eps_.repeat({n, 1, 1, 1});
    std::vector<int64_t> eps0_shape = {shared ? 1 : n};
    eps0_shape.insert(eps0_shape.end(), img.begin(), img.end());
    at::Tensor eps0 = at::randn(eps0_shape, gen, at::kDouble).expand_as(f_);
    VDM_ASSIGN_OR_RETURN(GammaValues ends,
                         model.Gamma(at::tensor({0.0f, 1.0f}, at::kFloat)));
    const at::Tensor g01 = ends.gamma.to(at::kCPU).to(at::kDouble);
    prior_ = PriorKl(f_.to(at::kDouble), g01[1].reshape({1}));
    recon_ = ReconstructionNll(x_, g01[0].reshape({1}), eps0);
    losses_ = at::empty({n * k}, at::kDouble);
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override {
    const int64_t total = static_cast<int64_t>(job_.images.size()) * job_.timesteps;
    const int64_t m = std::min(max_rows, total - cursor_);
    if (m <= 0) return {};
    const at::Tensor r = at::arange(cursor_, cursor_ + m, at::kLong);
    const at::Tensor image = r.div(job_.timesteps, "floor");
    Rows rows;
    rows.gamma = gamma_.narrow(0, cursor_, m).to(at::kFloat);
    rows.z = Diffuse(f_.index_select(0, image), rows.gamma,
                     eps_.narrow(0, cursor_, m));
    rows.label = at::full({m}, label_, at::kLong);
    taken_offset_ = cursor_;
    cursor_ += m;
    return rows;
  }

  absl::Status Give(const at::Tensor& eps_hat) override {
    const int64_t m = eps_hat.size(0);
    losses_.narrow(0, taken_offset_, m)
        .copy_(DiffusionLossContinuous(eps_.narrow(0, taken_offset_, m),
                                       eps_hat,
                                       dgamma_.narrow(0, taken_offset_, m))
                   .to(at::kDouble));
    received_ += m;
    return absl::OkStatus();
  }

  bool done() const override {
    return received_ ==
           static_cast<int64_t>(job_.images.size()) * job_.timesteps;
  }

  void Finish(absl::Status error) override {
    if (!error.ok()) return done_cb_(error);
    ScoreResult result;
    const int64_t n = static_cast<int64_t>(job_.images.size());
    const int64_t k = job_.timesteps;
    const at::Tensor l = losses_.reshape({n, k});
    const at::Tensor diffusion = l.mean(1);
    const at::Tensor var = StratifiedVariance(l);
    const double to_bpd = 1.0 / (static_cast<double>(dims_) * std::log(2.0));
    for (int64_t i = 0; i < n; ++i) {
      ImageBpd s;
      s.prior = prior_[i].item<double>() * to_bpd;
      s.recon = recon_[i].item<double>() * to_bpd;
      s.diffusion = diffusion[i].item<double>() * to_bpd;
      s.stderr_bpd = std::sqrt(var[i].item<double>()) * to_bpd;
      s.bpd = s.prior + s.recon + s.diffusion;
      result.scores.push_back(s);
    }
    result.network_evaluations = evaluations();
    result.queue_seconds = Seconds(first_forward() - arrival());
    result.compute_seconds = Seconds(absl::Now() - first_forward());
    done_cb_(std::move(result));
  }

 private:
  // Variance of the stratified mean (1/K) sum_k L_k, with one sample per
  // stratum, by collapsing adjacent strata into pairs: each pair (a, b)
  // estimates var_a + var_b by (a - b)^2 (biased up by the squared difference
  // of the strata means, which shrinks as K grows). The naive std/sqrt(K)
  // would count the spread between strata, which stratification removes.
  static at::Tensor StratifiedVariance(const at::Tensor& l) {
    const int64_t k = l.size(1);
    const int64_t pairs = k / 2;
    const at::Tensor a = l.narrow(1, 0, 2 * pairs).reshape({l.size(0), pairs, 2});
    const at::Tensor d = a.select(2, 0) - a.select(2, 1);
    // sum over pairs estimates sum of the 2*pairs strata variances; scale to K.
    const at::Tensor sum_var = d.pow(2).sum(1) * (static_cast<double>(k) / (2 * pairs));
    return sum_var / static_cast<double>(k * k);
  }

  const ScoreJob job_;
  Engine::ScoreCallback done_cb_;
  int64_t dims_ = 0;
  int64_t label_ = 0;
  at::Tensor x_, f_;           // [n, C, H, W] uint8 / f32
  at::Tensor gamma_, dgamma_;  // [n K]
  at::Tensor eps_;             // [n K, C, H, W]
  at::Tensor prior_, recon_;   // [n] nats
  at::Tensor losses_;          // [n K] nats
  int64_t cursor_ = 0, received_ = 0, taken_offset_ = 0;
};

}  // namespace

std::unique_ptr<Task> MakeSampleTask(const SampleJob& job,
                                     RequestControl control,
                                     Engine::SampleCallback done,
                                     absl::Time arrival) {
  return std::make_unique<SampleTask>(job, std::move(control), std::move(done),
                                      arrival);
}

int64_t SampleJobRows(const SampleJob& job, int num_classes) {
  const bool guided =
      job.label >= 0 && num_classes > 0 && job.guidance_scale != 1.0f;
  return int64_t{job.steps} * job.num_images * (guided ? 2 : 1);
}

std::unique_ptr<Task> MakeScoreTask(ScoreJob job, RequestControl control,
                                    Engine::ScoreCallback done,
                                    absl::Time arrival) {
  return std::make_unique<ScoreTask>(std::move(job), std::move(control),
                                     std::move(done), arrival);
}

}  // namespace vdm
