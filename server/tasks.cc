#include "server/tasks.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

#include "model/vdm/diffusion.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/samplers.h"
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
// Sampling: any sampler of model/vdm/samplers.h, with classifier-free
// guidance as a pair of rows per image (rows [0, n) carry the request's
// label, rows [n, 2n) "no label").
class SampleTask : public Task {
 public:
  SampleTask(const SampleJob& job, RequestControl control,
             Engine::SampleCallback done, absl::Time arrival)
      : Task(std::move(control), arrival),
        job_(job),
        config_(job.sampler),
        done_cb_(std::move(done)) {}

  bool is_score() const override { return false; }
  const char* method() const override { return "Sample"; }
  int64_t remaining_rows() const override {
    const int64_t used = sampler_ ? sampler_->evaluations() : 0;
    return (SamplerEvaluations(config_) - used) * rows_per_eval_ - cursor_;
  }

  absl::Status Start(Denoiser& model) override {
    const ImageShape s = model.shape();
    const int64_t n = job_.num_images;
    const int classes = model.num_classes();
    guided_ = job_.label >= 0 && classes > 0 && job_.guidance_scale != 1.0f;
    cond_label_ = (job_.label >= 0 && classes > 0) ? job_.label : classes;
    uncond_label_ = classes;
    rows_per_eval_ = guided_ ? 2 * n : n;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    const at::Tensor z1 =
        at::randn({n, s.channels, s.height, s.width}, gen, at::kFloat);
    VDM_ASSIGN_OR_RETURN(sampler_,
                         MakeSampler(config_, z1, ScheduleOf(model), gen));
    eps_ = at::empty({rows_per_eval_, s.channels, s.height, s.width},
                     at::kFloat);
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override {
    const int64_t m = std::min(max_rows, rows_per_eval_ - cursor_);
    if (m <= 0 || done()) return {};
    if (cursor_ == 0) input_ = sampler_->Next();
    const int64_t n = job_.num_images;
    const at::Tensor r = at::arange(cursor_, cursor_ + m, at::kLong);
    const at::Tensor image = r.remainder(n);
    Rows rows;
    rows.z = input_.z.index_select(0, image);
    rows.gamma = input_.gamma.index_select(0, image);
    rows.label = at::where(r < n, at::full({m}, cond_label_, at::kLong),
                           at::full({m}, uncond_label_, at::kLong));
    taken_offset_ = cursor_;
    cursor_ += m;
    return rows;
  }

  absl::Status Give(const at::Tensor& eps_hat) override {
    eps_.narrow(0, taken_offset_, eps_hat.size(0)).copy_(eps_hat);
    received_ += eps_hat.size(0);
    if (received_ < rows_per_eval_) return absl::OkStatus();
    const int64_t n = job_.num_images;
    const at::Tensor guided =
        guided_ ? Guide(eps_.narrow(0, n, n), eps_.narrow(0, 0, n),
                        at::full({1}, job_.guidance_scale, at::kFloat))
                : eps_;
    const int before = sampler_->step();
    VDM_RETURN_IF_ERROR(sampler_->Consume(guided));
    if (job_.progress && sampler_->step() > before) Report();
    cursor_ = 0;
    received_ = 0;
    return absl::OkStatus();
  }

  bool done() const override { return sampler_ && sampler_->done(); }

  void Finish(absl::Status error) override {
    if (!error.ok()) return done_cb_(error);
    SampleResult result;
    result.images = ToImages(sampler_->Images());
    result.network_evaluations = evaluations();
    result.queue_seconds = Seconds(first_forward() - arrival());
    result.compute_seconds = Seconds(absl::Now() - first_forward());
    done_cb_(std::move(result));
  }

 private:
  // Progress after a completed step; previews are x_hat of that step.
  void Report() const {
    SampleProgress progress;
    progress.step = sampler_->step();
    progress.total_steps = sampler_->steps();
    const int every = job_.preview_every;
    if (every > 0 && progress.step % every == 0 &&
        progress.step < progress.total_steps) {
      progress.previews = ToImages(ToUint8(sampler_->x_hat()));
    }
    job_.progress(std::move(progress));
  }

  const SampleJob job_;
  const SamplerConfig config_;
  Engine::SampleCallback done_cb_;
  bool guided_ = false;
  int64_t cond_label_ = 0, uncond_label_ = 0;
  int64_t rows_per_eval_ = 0;
  std::unique_ptr<Sampler> sampler_;
  NetworkInput input_;  // the current evaluation's inputs (n rows)
  at::Tensor eps_;      // [rows_per_eval, C, H, W] outputs of the evaluation
  int64_t cursor_ = 0, received_ = 0, taken_offset_ = 0;
};

// ---------------------------------------------------------------------------
// Scoring: a LikelihoodPlan (model/vdm/likelihood.h) handed out in chunks.
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
    at::Tensor x = at::empty({n, s.channels, s.height, s.width}, at::kByte);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(x[i].data_ptr<uint8_t>(), job_.images[i].pixels.data(),
                  s.dims());
    }
    label_ = job_.label >= 0 ? job_.label : model.num_classes();
    LikelihoodOptions options;
    options.times = job_.timesteps;
    options.shared_noise = job_.shared_noise;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    VDM_ASSIGN_OR_RETURN(
        plan_, LikelihoodPlan::Create(x, options, ScheduleOf(model), gen));
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override {
    const int64_t m = std::min(max_rows, plan_->rows() - cursor_);
    if (m <= 0) return {};
    absl::StatusOr<ScoreRows> r = plan_->Rows(cursor_, m);
    if (!r.ok()) return {};  // cannot happen: [cursor_, cursor_ + m) is valid
    Rows rows;
    rows.z = r->z;
    rows.gamma = r->gamma;
    rows.label = at::full({m}, label_, at::kLong);
    taken_offset_ = cursor_;
    cursor_ += m;
    return rows;
  }

  absl::Status Give(const at::Tensor& eps_hat) override {
    return plan_->Consume(taken_offset_, eps_hat);
  }

  bool done() const override { return plan_ && plan_->complete(); }

  void Finish(absl::Status error) override {
    if (!error.ok()) return done_cb_(error);
    absl::StatusOr<BpdScores> s = plan_->Result();
    if (!s.ok()) return done_cb_(s.status());
    ScoreResult result;
    for (int64_t i = 0; i < plan_->num_images(); ++i) {
      ImageBpd b;
      b.bpd = s->bpd[i].item<double>();
      b.prior = s->prior[i].item<double>();
      b.recon = s->recon[i].item<double>();
      b.diffusion = s->diffusion[i].item<double>();
      b.stderr_bpd = s->stderr_bpd[i].item<double>();
      result.scores.push_back(b);
    }
    result.network_evaluations = evaluations();
    result.queue_seconds = Seconds(first_forward() - arrival());
    result.compute_seconds = Seconds(absl::Now() - first_forward());
    done_cb_(std::move(result));
  }

 private:
  const ScoreJob job_;
  Engine::ScoreCallback done_cb_;
  int64_t label_ = 0;
  std::unique_ptr<LikelihoodPlan> plan_;
  int64_t cursor_ = 0, taken_offset_ = 0;
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
  return SamplerEvaluations(job.sampler) * job.num_images *
         (guided ? 2 : 1);
}

std::unique_ptr<Task> MakeScoreTask(ScoreJob job, RequestControl control,
                                    Engine::ScoreCallback done,
                                    absl::Time arrival) {
  return std::make_unique<ScoreTask>(std::move(job), std::move(control),
                                     std::move(done), arrival);
}

}  // namespace vdm
