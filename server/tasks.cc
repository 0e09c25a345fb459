#include "server/tasks.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <vector>

#include "model/vdm/anomaly.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/image_scores.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/local_match.h"
#include "model/vdm/ode_likelihood.h"
#include "model/vdm/reconstruction.h"
#include "model/vdm/request.h"
#include "model/vdm/rows.h"
#include "model/vdm/samplers.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/tensor_image.h"

namespace vdm {

namespace {

// One evaluation of a plan handed out in chunks of rows: all rows of an
// evaluation must be back before the plan advances (a step of a sampler, a
// stage of the ODE's RK4, the ELBO's n x K rows at once).
class Chunks {
 public:
  Rows Take(RowPlan& plan, int64_t max_rows) {
    if (plan.done() || max_rows <= 0) return {};
    // An evaluation's size is known once its rows are (an adaptive ODE
    // drops trajectories as they finish).
    if (cursor_ == 0) input_ = plan.Next();
    const int64_t m = std::min(max_rows, input_.size() - cursor_);
    if (m <= 0) return {};
    taken_offset_ = cursor_;
    cursor_ += m;
    return input_.Slice(taken_offset_, m);
  }
  // Keeps the outputs for the rows of the last Take; true when all rows of
  // the evaluation are back (then whole() holds them and the next Take
  // starts the next evaluation).
  bool Give(const Evaluation& part) {
    const int64_t total = input_.size();
    Keep(part.eps, total, &whole_.eps);
    Keep(part.vjp, total, &whole_.vjp);
    Keep(part.background, total, &whole_.background);
    received_ += part.eps.size(0);
    if (received_ < total) return false;
    cursor_ = 0;
    received_ = 0;
    return true;
  }
  const Evaluation& whole() const { return whole_; }

 private:
  void Keep(const at::Tensor& part, int64_t total, at::Tensor* into) const {
    if (!part.defined()) return;
    if (!into->defined() || into->size(0) != total) {
      std::vector<int64_t> dims = part.sizes().vec();
      dims[0] = total;
      *into = at::empty(dims, at::kFloat);
    }
    into->narrow(0, taken_offset_, part.size(0)).copy_(part);
  }

  Rows input_;         // the current evaluation's rows
  Evaluation whole_;   // the outputs for all of them
  int64_t cursor_ = 0, received_ = 0, taken_offset_ = 0;
};

// What every task shares: its plan's rows go out in chunks, and the result
// reaches the job's callback with the task's cost and times.
template <class Result>
class PlanTask : public Task {
 public:
  using Callback = std::function<void(absl::StatusOr<Result>)>;
  explicit PlanTask(Callback done) : done_cb_(std::move(done)) {}

  Rows Take(int64_t max_rows) override {
    return plan_ ? chunks_.Take(*plan_, max_rows) : Rows();
  }
  absl::Status Give(const Evaluation& out) override {
    if (!chunks_.Give(out)) return absl::OkStatus();
    return Advance(chunks_.whole());
  }
  bool done() const override { return plan_ && plan_->done(); }
  void Finish(absl::Status error, absl::Time now) override {
    if (!error.ok()) return done_cb_(error);
    absl::StatusOr<Result> result = MakeResult();
    if (result.ok()) {
      result->network_evaluations = evaluations();
      result->queue_seconds = QueueSeconds();
      result->compute_seconds = ComputeSeconds(now);
    }
    done_cb_(std::move(result));
  }

 protected:
  // All outputs of the plan's current evaluation are back.
  virtual absl::Status Advance(const Evaluation& out) {
    return plan_->Consume(out);
  }
  // The result once done (costs and times are filled in by Finish).
  virtual absl::StatusOr<Result> MakeResult() = 0;

  RowPlan* plan_ = nullptr;  // set by Start; owned by the subclass

 private:
  Callback done_cb_;
  Chunks chunks_;
};

// Sampling: a SamplingPlan, with the job's edit and progress reports.
class SampleTask : public PlanTask<SampleResult> {
 public:
  SampleTask(SampleJob job, int num_classes, SampleCallback done)
      : PlanTask(std::move(done)), job_(std::move(job)),
        num_classes_(num_classes) {}

  Cost cost() const override {
    return {SampleRowCost(job_.sampler, job_.num_images, job_.conditioning,
                          num_classes_),
            job_.num_images * RowsPerImage(job_.conditioning, num_classes_)};
  }
  const char* method() const override { return "Sample"; }

  absl::Status Start(Denoiser& model, bool /*has_background*/) override {
    const ImageShape s = model.shape();
    VDM_ASSIGN_OR_RETURN(const SampleEdit edit, MakeEdit(s));
    VDM_ASSIGN_OR_RETURN(
        plan_owned_, SamplingPlan::Create(job_.sampler, job_.num_images,
                                          job_.conditioning, s,
                                          model.num_classes(), job_.seed,
                                          ScheduleOf(model), at::Tensor(),
                                          edit));
    plan_ = plan_owned_.get();
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<SampleEdit> MakeEdit(const ImageShape& s) const {
    SampleEdit edit;
    if (job_.reference) {
      VDM_ASSIGN_OR_RETURN(edit.reference, ToTensor({*job_.reference}, s));
      edit.strength = job_.strength;
      edit.strength_scale = job_.strength_is_time
                                ? SampleEdit::StrengthScale::kTime
                                : SampleEdit::StrengthScale::kNoiseFraction;
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
    return edit;
  }

  absl::Status Advance(const Evaluation& out) override {
    const int before = plan_owned_->sampler().step();
    VDM_RETURN_IF_ERROR(plan_owned_->Consume(out));
    if (job_.progress && plan_owned_->sampler().step() > before) Report();
    return absl::OkStatus();
  }

  absl::StatusOr<SampleResult> MakeResult() override {
    SampleResult result;
    result.images = ToImages(plan_owned_->Images());
    return result;
  }

  // Progress after a completed step (previews are x_hat of that step),
  // delivered off the worker thread, before the result.
  void Report() const {
    const Sampler& sampler = plan_owned_->sampler();
    SampleProgress progress;
    progress.step = sampler.step();
    progress.total_steps = sampler.steps();
    const int every = job_.preview_every;
    if (every > 0 && progress.step % every == 0 &&
        progress.step < progress.total_steps) {
      progress.previews = ToImages(ToUint8(sampler.x_hat()));
    }
    Post([report = job_.progress, p = std::move(progress)]() mutable {
      report(std::move(p));
    });
  }

  const SampleJob job_;
  const int num_classes_;
  std::unique_ptr<SamplingPlan> plan_owned_;
};

// Encode: an EncodePlan (DDIM inversion); the result is the latents.
class EncodeTask : public PlanTask<EncodeResult> {
 public:
  EncodeTask(EncodeJob job, EncodeCallback done)
      : PlanTask(std::move(done)), job_(std::move(job)) {}

  Cost cost() const override {
    const int64_t n = static_cast<int64_t>(job_.images.size());
    return {EncodeRowCost(n, job_.sampler.steps), n};
  }
  const char* method() const override { return "Encode"; }

  absl::Status Start(Denoiser& model, bool /*has_background*/) override {
    shape_ = model.shape();
    VDM_ASSIGN_OR_RETURN(const at::Tensor x, ToTensor(job_.images, shape_));
    VDM_ASSIGN_OR_RETURN(
        plan_owned_, EncodePlan::Create(x, job_.sampler, job_.label, shape_,
                                        model.num_classes(), ScheduleOf(model)));
    plan_ = plan_owned_.get();
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<EncodeResult> MakeResult() override {
    EncodeResult result;
    result.shape = shape_;
    const at::Tensor z = plan_owned_->z().to(at::kFloat).contiguous();
    const int64_t d = shape_.dims();
    for (int64_t i = 0; i < z.size(0); ++i) {
      const float* p = z.data_ptr<float>() + i * d;
      result.latents.emplace_back(p, p + d);
    }
    return result;
  }

  const EncodeJob job_;
  ImageShape shape_;
  std::unique_ptr<EncodePlan> plan_owned_;
};

// The images of a score job as a tensor, with their labels ("no label" =
// num_classes).
struct ScoreInputs {
  at::Tensor x, labels;
};
absl::StatusOr<ScoreInputs> MakeScoreInputs(const ScoreJob& job,
                                            const Denoiser& model) {
  VDM_ASSIGN_OR_RETURN(at::Tensor x, ToTensor(job.images, model.shape()));
  const int64_t label = job.label >= 0 ? job.label : model.num_classes();
  at::Tensor labels = at::full({x.size(0)}, label, at::kLong);
  return ScoreInputs{std::move(x), std::move(labels)};
}

// ScoreBPD by the ELBO: a LikelihoodPlan, and with the worker's background
// model a second plan over the same rows. Its rows stream: a chunk is
// consumed as soon as it comes back (LikelihoodPlan::RowsAt and
// Consume(begin, ...)), so the n x K rows of a large request are never all
// in memory at once, as the whole-evaluation RowPlan form would hold them.
// At the thorough anomaly level a ReconstructionPlan's rows follow the
// ELBO's (in the same shared batches), and the result gets each image's
// ThoroughFeatures from the job's feature network.
class ScoreTask : public PlanTask<ScoreResult> {
 public:
  ScoreTask(ScoreJob job, ScoreCallback done)
      : PlanTask(std::move(done)), job_(std::move(job)) {}

  Cost cost() const override {
    const int64_t rows =
        ScoreJobRowCost(job_, static_cast<int64_t>(job_.images.size()));
    return {rows, rows};  // all rows of every image at once
  }
  bool likelihood() const override { return true; }
  const char* method() const override { return "ScoreBPD"; }
  // The probe rows need no background model.
  bool wants_background() const override {
    return background_ != nullptr && last_take_elbo_;
  }
  bool done() const override {
    return plan_owned_ && plan_owned_->complete() &&
           (!reconstruct_ || reconstruct_->complete());
  }

  Rows Take(int64_t max_rows) override {
    if (!plan_owned_) return {};
    const int64_t elbo = plan_owned_->rows();
    const int64_t total = elbo + (reconstruct_ ? reconstruct_->rows() : 0);
    // One plan's rows per take: the ELBO's first, then the probes.
    const int64_t end = cursor_ < elbo ? elbo : total;
    const int64_t m = std::min(max_rows, end - cursor_);
    if (m <= 0) return {};
    absl::StatusOr<Rows> rows =
        cursor_ < elbo ? plan_owned_->RowsAt(cursor_, m)
                       : reconstruct_->RowsAt(cursor_ - elbo, m);
    if (!rows.ok()) return {};  // cannot happen: the range is valid
    last_take_elbo_ = cursor_ < elbo;
    taken_offset_ = cursor_;
    cursor_ += m;
    return *std::move(rows);
  }

  absl::Status Give(const Evaluation& out) override {
    const int64_t elbo = plan_owned_->rows();
    if (taken_offset_ >= elbo) {
      return reconstruct_->Consume(taken_offset_ - elbo, out.eps);
    }
    VDM_RETURN_IF_ERROR(plan_owned_->Consume(taken_offset_, out.eps));
    if (!background_) return absl::OkStatus();
    if (!out.background.defined()) {
      return absl::InternalError("no background model outputs");
    }
    return background_->Consume(taken_offset_, out.background);
  }

  absl::Status Start(Denoiser& model, bool has_background) override {
    VDM_ASSIGN_OR_RETURN(const ScoreInputs in, MakeScoreInputs(job_, model));
    LikelihoodOptions options;
    options.times = job_.timesteps;
    options.shared_noise = job_.shared_noise;
    options.time_proposal = job_.time_proposal;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    VDM_ASSIGN_OR_RETURN(
        plan_owned_, LikelihoodPlan::Create(in.x, in.labels, options,
                                            ScheduleOf(model), gen));
    plan_ = plan_owned_.get();
    if (has_background) {
      // The same draws from the same seed and the model's schedule: the
      // background plan's rows are the main plan's, so only its eps_hat
      // (Evaluation::background) differs.
      at::Generator again = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
      VDM_ASSIGN_OR_RETURN(
          background_, LikelihoodPlan::Create(in.x, in.labels, options,
                                              ScheduleOf(model), again));
    }
    if (job_.thorough) {
      if (job_.feature_model == nullptr || job_.reference == nullptr) {
        return absl::FailedPreconditionError(
            "the thorough anomaly level needs a feature model and its reference");
      }
      VDM_ASSIGN_OR_RETURN(
          reconstruct_,
          ReconstructionPlan::Create(in.x, in.labels, ProbesOf(*job_.thorough),
                                     ScheduleOf(model)));
      x_ = in.x;
    }
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<ScoreResult> MakeResult() override {
    VDM_ASSIGN_OR_RETURN(const BpdScores s, plan_owned_->Result());
    std::optional<BpdScores> b;
    if (background_) {
      VDM_ASSIGN_OR_RETURN(b, background_->Result());
    }
    ScoreResult result;
    VDM_ASSIGN_OR_RETURN(result.scores,
                         ImageScoresOf(s, job_.images, job_.pixel_map,
                                       b ? &*b : nullptr));
    if (reconstruct_) {
      VDM_RETURN_IF_ERROR(AddThoroughFeatures(*reconstruct_, x_,
                                              *job_.feature_model,
                                              &result.scores));
      VDM_RETURN_IF_ERROR(AddLocalMatch(*job_.reference, *job_.thorough, x_,
                                        *job_.feature_model, &result.scores));
    }
    return result;
  }

  const ScoreJob job_;
  std::unique_ptr<LikelihoodPlan> plan_owned_;
  std::unique_ptr<LikelihoodPlan> background_;  // with a background model
  std::unique_ptr<ReconstructionPlan> reconstruct_;  // thorough level
  at::Tensor x_;  // the images, uint8 [n, C, H, W] (thorough level)
  int64_t cursor_ = 0, taken_offset_ = 0;
  bool last_take_elbo_ = true;
};

// ScoreBPD by the probability-flow ODE: an OdeLikelihoodPlan, whose rows
// carry probes and run in forward + backward passes.
class OdeScoreTask : public PlanTask<ScoreResult> {
 public:
  OdeScoreTask(ScoreJob job, ScoreCallback done)
      : PlanTask(std::move(done)), job_(std::move(job)) {}

  Cost cost() const override {
    const int64_t n = static_cast<int64_t>(job_.images.size());
    // One row per image and trace sample per evaluation.
    // At most: an adaptive solve stops costing rows as each of its
    // trajectories (one per image and trace sample) finishes.
    return {OdeRowCost(n, job_.ode), n * job_.ode.trace_samples};
  }
  Pass pass() const override { return Pass::kForwardVjp; }
  bool likelihood() const override { return true; }
  const char* method() const override { return "ScoreBPD"; }

  absl::Status Start(Denoiser& model, bool /*has_background*/) override {
    VDM_ASSIGN_OR_RETURN(const ScoreInputs in, MakeScoreInputs(job_, model));
    const OdeOptions& options = job_.ode;
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(job_.seed);
    VDM_ASSIGN_OR_RETURN(plan_owned_,
                         OdeLikelihoodPlan::Create(in.x, in.labels, options,
                                                   ScheduleOf(model), gen));
    plan_ = plan_owned_.get();
    return absl::OkStatus();
  }

 private:
  absl::StatusOr<ScoreResult> MakeResult() override {
    VDM_ASSIGN_OR_RETURN(const OdeScores s, plan_owned_->Result());
    ScoreResult result;
    result.scores = ImageScoresOf(s);
    return result;
  }

  const ScoreJob job_;
  std::unique_ptr<OdeLikelihoodPlan> plan_owned_;
};

}  // namespace

std::unique_ptr<Task> MakeSampleTask(SampleJob job, int num_classes,
                                     SampleCallback done) {
  return std::make_unique<SampleTask>(std::move(job), num_classes,
                                      std::move(done));
}

std::unique_ptr<Task> MakeEncodeTask(EncodeJob job, EncodeCallback done) {
  return std::make_unique<EncodeTask>(std::move(job), std::move(done));
}

std::unique_ptr<Task> MakeScoreTask(ScoreJob job, ScoreCallback done) {
  if (job.method == ScoreMethod::kOde) {
    return std::make_unique<OdeScoreTask>(std::move(job), std::move(done));
  }
  return std::make_unique<ScoreTask>(std::move(job), std::move(done));
}

}  // namespace vdm
