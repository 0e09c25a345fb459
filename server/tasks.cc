#include "server/tasks.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/vdm/anomaly.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/ode_likelihood.h"
#include "model/vdm/samplers.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/tensor_image.h"

namespace vdm {

double Task::QueueSeconds() const {
  if (!started_forward()) return 0;
  return absl::ToDoubleSeconds(first_forward_ - arrival_);
}

double Task::ComputeSeconds(absl::Time now) const {
  if (!started_forward()) return 0;
  return absl::ToDoubleSeconds(now - first_forward_);
}

namespace {

// One evaluation of a step-wise plan (SamplingPlan, EncodePlan: all rows of
// a step must be back before it advances) handed out in chunks of rows.
class StepChunks {
 public:
  template <class Plan>
  Rows Take(const Plan& plan, int64_t max_rows) {
    const int64_t m = std::min(max_rows, plan.rows_per_evaluation() - cursor_);
    if (m <= 0 || plan.done()) return {};
    if (cursor_ == 0) input_ = plan.Next();
    taken_offset_ = cursor_;
    cursor_ += m;
    return input_.Slice(taken_offset_, m);
  }
  // Keeps eps_hat for the rows of the last Take; true when all `total` rows
  // of the evaluation are back (then eps() holds them and the next Take
  // starts the next evaluation).
  bool Give(const at::Tensor& eps_hat, int64_t total) {
    if (!eps_.defined() || eps_.size(0) != total) {
      std::vector<int64_t> dims = eps_hat.sizes().vec();
      dims[0] = total;
      eps_ = at::empty(dims, at::kFloat);
    }
    eps_.narrow(0, taken_offset_, eps_hat.size(0)).copy_(eps_hat);
    received_ += eps_hat.size(0);
    if (received_ < total) return false;
    cursor_ = 0;
    received_ = 0;
    return true;
  }
  const at::Tensor& eps() const { return eps_; }

 private:
  Rows input_;      // the current evaluation's rows
  at::Tensor eps_;  // [total, C, H, W] outputs of it
  int64_t cursor_ = 0, received_ = 0, taken_offset_ = 0;
};

// A SamplingPlan's evaluation handed out in chunks of rows.
class SampleTask : public Task {
 public:
  SampleTask(SampleJob job, RequestControl control, SampleCallback done,
             absl::Time arrival)
      : Task(std::move(control), arrival),
        job_(std::move(job)),
        done_cb_(std::move(done)) {}

  bool is_score() const override { return false; }
  const char* method() const override { return "Sample"; }

  absl::Status Start(Denoiser& model) override {
    const ImageShape s = model.shape();
    SampleEdit edit;
    if (job_.reference) {
      VDM_ASSIGN_OR_RETURN(edit.reference, ToTensor({*job_.reference}, s));
      edit.strength = job_.strength;
      if (!job_.known.empty()) {
        edit.known = at::from_blob(const_cast<uint8_t*>(job_.known.data()),
                                   {1, 1, s.height, s.width}, at::kByte)
                         .to(at::kBool);
      }
    }
    if (!job_.latents.empty()) {
      const int64_t d = s.dims();
      edit.z1 = at::empty({static_cast<int64_t>(job_.latents.size()),
                           s.channels, s.height, s.width},
                          at::kFloat);
      for (size_t i = 0; i < job_.latents.size(); ++i) {
        if (static_cast<int64_t>(job_.latents[i].size()) != d) {
          return absl::InvalidArgumentError("latents: wrong size");
        }
        std::copy(job_.latents[i].begin(), job_.latents[i].end(),
                  edit.z1.data_ptr<float>() + static_cast<int64_t>(i) * d);
      }
    }
    VDM_ASSIGN_OR_RETURN(
        plan_, SamplingPlan::Create(job_.sampler, job_.num_images,
                                    job_.conditioning, s, model.num_classes(),
                                    job_.seed, ScheduleOf(model), at::Tensor(),
                                    edit));
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override { return chunks_.Take(*plan_, max_rows); }

  absl::Status Give(const at::Tensor& eps_hat) override {
    if (!chunks_.Give(eps_hat, plan_->rows_per_evaluation())) {
      return absl::OkStatus();
    }
    const int before = plan_->sampler().step();
    VDM_RETURN_IF_ERROR(plan_->Consume(chunks_.eps()));
    if (job_.progress && plan_->sampler().step() > before) Report();
    return absl::OkStatus();
  }

  bool done() const override { return plan_ && plan_->done(); }

  void Finish(absl::Status error, absl::Time now) override {
    if (!error.ok()) return done_cb_(error);
    SampleResult result;
    result.images = ToImages(plan_->Images());
    result.network_evaluations = evaluations();
    result.queue_seconds = QueueSeconds();
    result.compute_seconds = ComputeSeconds(now);
    done_cb_(std::move(result));
  }

 private:
  // Progress after a completed step; previews are x_hat of that step.
  void Report() const {
    const Sampler& sampler = plan_->sampler();
    SampleProgress progress;
    progress.step = sampler.step();
    progress.total_steps = sampler.steps();
    const int every = job_.preview_every;
    if (every > 0 && progress.step % every == 0 &&
        progress.step < progress.total_steps) {
      progress.previews = ToImages(ToUint8(sampler.x_hat()));
    }
    job_.progress(std::move(progress));
  }

  const SampleJob job_;
  SampleCallback done_cb_;
  std::unique_ptr<SamplingPlan> plan_;
  StepChunks chunks_;
};

// An EncodePlan (DDIM inversion) handed out in chunks of rows.
class EncodeTask : public Task {
 public:
  EncodeTask(EncodeJob job, RequestControl control, EncodeCallback done,
             absl::Time arrival)
      : Task(std::move(control), arrival),
        job_(std::move(job)),
        done_cb_(std::move(done)) {}

  bool is_score() const override { return false; }
  const char* method() const override { return "Encode"; }

  absl::Status Start(Denoiser& model) override {
    shape_ = model.shape();
    VDM_ASSIGN_OR_RETURN(const at::Tensor x, ToTensor(job_.images, shape_));
    VDM_ASSIGN_OR_RETURN(
        plan_, EncodePlan::Create(x, job_.sampler, job_.label, shape_,
                                  model.num_classes(), ScheduleOf(model)));
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override { return chunks_.Take(*plan_, max_rows); }

  absl::Status Give(const at::Tensor& eps_hat) override {
    if (!chunks_.Give(eps_hat, plan_->rows_per_evaluation())) {
      return absl::OkStatus();
    }
    return plan_->Consume(chunks_.eps());
  }

  bool done() const override { return plan_ && plan_->done(); }

  void Finish(absl::Status error, absl::Time now) override {
    if (!error.ok()) return done_cb_(error);
    EncodeResult result;
    result.shape = shape_;
    const at::Tensor z = plan_->z().to(at::kFloat).contiguous();
    const int64_t d = shape_.dims();
    for (int64_t i = 0; i < z.size(0); ++i) {
      const float* p = z.data_ptr<float>() + i * d;
      result.latents.emplace_back(p, p + d);
    }
    result.network_evaluations = evaluations();
    result.queue_seconds = QueueSeconds();
    result.compute_seconds = ComputeSeconds(now);
    done_cb_(std::move(result));
  }

 private:
  const EncodeJob job_;
  EncodeCallback done_cb_;
  ImageShape shape_;
  std::unique_ptr<EncodePlan> plan_;
  StepChunks chunks_;
};

// A LikelihoodPlan handed out in chunks of rows.
// What the ELBO and the ODE score tasks share: the job, the images as a
// tensor with their labels ("no label" = num_classes), and the delivery of
// the result with the task's cost and times.
class ScoreTaskBase : public Task {
 public:
  ScoreTaskBase(ScoreJob job, RequestControl control, ScoreCallback done,
                absl::Time arrival)
      : Task(std::move(control), arrival),
        job_(std::move(job)),
        done_cb_(std::move(done)) {}

  bool is_score() const override { return true; }
  const char* method() const override { return "ScoreBPD"; }

 protected:
  struct Inputs {
    at::Tensor x, labels;
  };
  absl::StatusOr<Inputs> MakeInputs(const Denoiser& model) const {
    VDM_ASSIGN_OR_RETURN(at::Tensor x, ToTensor(job_.images, model.shape()));
    const int64_t label = job_.label >= 0 ? job_.label : model.num_classes();
    at::Tensor labels = at::full({x.size(0)}, label, at::kLong);
    return Inputs{std::move(x), std::move(labels)};
  }
  void Deliver(ScoreResult result, absl::Time now) {
    result.network_evaluations = evaluations();
    result.queue_seconds = QueueSeconds();
    result.compute_seconds = ComputeSeconds(now);
    done_cb_(std::move(result));
  }

  const ScoreJob job_;
  ScoreCallback done_cb_;
};

class ScoreTask : public ScoreTaskBase {
 public:
  using ScoreTaskBase::ScoreTaskBase;

  absl::Status Start(Denoiser& model) override {
    VDM_ASSIGN_OR_RETURN(const Inputs in, MakeInputs(model));
    const at::Tensor& x = in.x;
    const at::Tensor& labels = in.labels;
    LikelihoodOptions options;
    options.times = job_.timesteps;
    options.shared_noise = job_.shared_noise;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    VDM_ASSIGN_OR_RETURN(plan_, LikelihoodPlan::Create(x, labels, options,
                                                       ScheduleOf(model), gen));
    if (job_.background) {
      // The same draws from the same seed and the model's schedule: the
      // background plan's rows are the main plan's, so only its eps_hat
      // (GiveBackground) differ.
      at::Generator again = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
      VDM_ASSIGN_OR_RETURN(
          background_, LikelihoodPlan::Create(x, labels, options,
                                              ScheduleOf(model), again));
    }
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override {
    const int64_t m = std::min(max_rows, plan_->rows() - cursor_);
    if (m <= 0) return {};
    absl::StatusOr<Rows> rows = plan_->RowsAt(cursor_, m);
    if (!rows.ok()) return {};  // cannot happen: [cursor_, cursor_ + m) is valid
    taken_offset_ = cursor_;
    cursor_ += m;
    return *std::move(rows);
  }

  absl::Status Give(const at::Tensor& eps_hat) override {
    return plan_->Consume(taken_offset_, eps_hat);
  }

  bool wants_background() const override { return background_ != nullptr; }
  absl::Status GiveBackground(const at::Tensor& eps_hat) override {
    if (!background_) return absl::InternalError("no background plan");
    return background_->Consume(taken_offset_, eps_hat);
  }

  bool done() const override {
    return plan_ && plan_->complete() &&
           (!background_ || background_->complete());
  }

  void Finish(absl::Status error, absl::Time now) override {
    if (!error.ok()) return done_cb_(error);
    absl::StatusOr<BpdScores> s = plan_->Result();
    if (!s.ok()) return done_cb_(s.status());
    at::Tensor background_bpd;
    if (background_) {
      absl::StatusOr<BpdScores> b = background_->Result();
      if (!b.ok()) return done_cb_(b.status());
      background_bpd = b->bpd;
    }
    ScoreResult result;
    for (int64_t i = 0; i < plan_->num_images(); ++i) {
      ImageBpd b;
      b.bpd = s->bpd[i].item<double>();
      b.prior = s->prior[i].item<double>();
      b.recon = s->recon[i].item<double>();
      b.diffusion = s->diffusion[i].item<double>();
      b.stderr_bpd = s->stderr_bpd[i].item<double>();
      const at::Tensor band = s->band[i].contiguous();
      b.band.assign(band.data_ptr<double>(), band.data_ptr<double>() + band.numel());
      absl::StatusOr<double> complexity = ComplexityBpd(job_.images[i]);
      if (!complexity.ok()) return done_cb_(complexity.status());
      b.complexity = *complexity;
      if (background_bpd.defined()) {
        b.background_bpd = background_bpd[i].item<double>();
      }
      if (job_.pixel_map) {
        const at::Tensor map = s->pixel_bits[i].to(at::kFloat).contiguous();
        b.pixel_bits.assign(map.data_ptr<float>(),
                            map.data_ptr<float>() + map.numel());
      }
      result.scores.push_back(std::move(b));
    }
    Deliver(std::move(result), now);
  }

 private:
  std::unique_ptr<LikelihoodPlan> plan_;
  std::unique_ptr<LikelihoodPlan> background_;  // ScoreJob::background
  int64_t cursor_ = 0, taken_offset_ = 0;
};

// An OdeLikelihoodPlan: every evaluation's n x M rows (with probes) handed
// out in chunks; the plan advances when all of them are back.
class OdeScoreTask : public ScoreTaskBase {
 public:
  using ScoreTaskBase::ScoreTaskBase;

  bool needs_vjp() const override { return true; }

  absl::Status Start(Denoiser& model) override {
    VDM_ASSIGN_OR_RETURN(const Inputs in, MakeInputs(model));
    OdeOptions options;
    options.steps = job_.ode_steps;
    options.trace_samples = job_.trace_samples;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    VDM_ASSIGN_OR_RETURN(plan_,
                         OdeLikelihoodPlan::Create(in.x, in.labels, options,
                                                   ScheduleOf(model), gen));
    const ImageShape s = model.shape();
    eps_ = at::empty(
        {plan_->rows_per_evaluation(), s.channels, s.height, s.width},
        at::kFloat);
    vjp_ = at::empty_like(eps_);
    return absl::OkStatus();
  }

  Rows Take(int64_t max_rows) override {
    const int64_t m =
        std::min(max_rows, plan_->rows_per_evaluation() - cursor_);
    if (m <= 0 || done()) return {};
    if (cursor_ == 0) input_ = plan_->Next();
    taken_offset_ = cursor_;
    cursor_ += m;
    return input_.Slice(taken_offset_, m);
  }

  absl::Status Give(const at::Tensor&) override {
    return absl::InternalError("ODE rows need vector-Jacobian products");
  }

  absl::Status GiveVjp(const at::Tensor& eps_hat,
                       const at::Tensor& vjp) override {
    eps_.narrow(0, taken_offset_, eps_hat.size(0)).copy_(eps_hat);
    vjp_.narrow(0, taken_offset_, vjp.size(0)).copy_(vjp);
    received_ += eps_hat.size(0);
    if (received_ < plan_->rows_per_evaluation()) return absl::OkStatus();
    cursor_ = 0;
    received_ = 0;
    return plan_->Consume(eps_, vjp_);
  }

  bool done() const override { return plan_ && plan_->done(); }

  void Finish(absl::Status error, absl::Time now) override {
    if (!error.ok()) return done_cb_(error);
    absl::StatusOr<OdeScores> s = plan_->Result();
    if (!s.ok()) return done_cb_(s.status());
    ScoreResult result;
    for (int64_t i = 0; i < plan_->num_images(); ++i) {
      ImageBpd b;
      b.bpd = s->bpd[i].item<double>();
      b.ode_function_evaluations = s->function_evaluations;
      const double se = s->stderr_bpd[i].item<double>();
      if (!std::isnan(se)) b.ode_stderr_bpd = se;
      result.scores.push_back(std::move(b));
    }
    Deliver(std::move(result), now);
  }

 private:
  std::unique_ptr<OdeLikelihoodPlan> plan_;
  Rows input_;
  at::Tensor eps_, vjp_;
  int64_t cursor_ = 0, received_ = 0, taken_offset_ = 0;
};

}  // namespace

std::unique_ptr<Task> MakeSampleTask(SampleJob job, RequestControl control,
                                     SampleCallback done, absl::Time arrival) {
  return std::make_unique<SampleTask>(std::move(job), std::move(control),
                                      std::move(done), arrival);
}

std::unique_ptr<Task> MakeEncodeTask(EncodeJob job, RequestControl control,
                                     EncodeCallback done, absl::Time arrival) {
  return std::make_unique<EncodeTask>(std::move(job), std::move(control),
                                      std::move(done), arrival);
}

std::unique_ptr<Task> MakeScoreTask(ScoreJob job, RequestControl control,
                                    ScoreCallback done, absl::Time arrival) {
  if (job.method == ScoreMethod::kOde) {
    return std::make_unique<OdeScoreTask>(std::move(job), std::move(control),
                                          std::move(done), arrival);
  }
  return std::make_unique<ScoreTask>(std::move(job), std::move(control),
                                     std::move(done), arrival);
}

}  // namespace vdm
