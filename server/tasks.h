// The units of work of the engine: one Task per admitted job. A task is a
// small state machine over a library plan (SamplingPlan, EncodePlan or
// LikelihoodPlan): it hands out rows for the next forward pass (Take),
// receives the network's eps_hat for them (Give) and advances when all rows
// of its current step are back. Every task owns its random number generator, so its result does not
// depend on what else shares the batch.
//
// Not thread-safe: a task lives on one worker thread until it is finished;
// Finish then runs once, on the engine's completion thread.
#ifndef VDM_SERVER_TASKS_H_
#define VDM_SERVER_TASKS_H_

#include <memory>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/rows.h"
#include "server/jobs.h"

namespace vdm {

class Task {
 public:
  Task(RequestControl control, absl::Time arrival)
      : control_(std::move(control)), arrival_(arrival) {}
  virtual ~Task() = default;

  virtual bool is_score() const = 0;
  virtual const char* method() const = 0;

  // Prepares tensors (time grid, noise) on the worker thread.
  virtual absl::Status Start(Denoiser& model) = 0;
  // Up to `max_rows` rows of the current step (none when done).
  virtual Rows Take(int64_t max_rows) = 0;
  // eps_hat for the rows of the last Take.
  virtual absl::Status Give(const at::Tensor& eps_hat) = 0;
  // Rows that also need v^T d eps_hat / d z (Rows::probe set; the ODE
  // likelihood) are evaluated in their own forward + backward pass and
  // given back with GiveVjp instead of Give.
  virtual bool needs_vjp() const { return false; }
  virtual absl::Status GiveVjp(const at::Tensor& eps_hat,
                               const at::Tensor& vjp) {
    return absl::InternalError("this task takes no vector-Jacobian products");
  }
  virtual bool done() const = 0;
  // Whether the rows of the last Take also go to the engine's background
  // model (a score task of an engine that has one), and that model's eps_hat
  // for them, from the same batch.
  virtual bool wants_background() const { return false; }
  virtual absl::Status GiveBackground(const at::Tensor& /*eps_hat*/) {
    return absl::OkStatus();
  }
  // Delivers the result (when `error` is OK and the task is done) or
  // `error` to the caller; `now` is when the task left the worker.
  virtual void Finish(absl::Status error, absl::Time now) = 0;

  const RequestControl& control() const { return control_; }
  absl::Time arrival() const { return arrival_; }
  // Set by the worker at the first forward pass of this task.
  absl::Time first_forward() const { return first_forward_; }
  bool started_forward() const {
    return first_forward_ != absl::InfinitePast();
  }
  void MarkForward(absl::Time now) {
    if (!started_forward()) first_forward_ = now;
  }
  int64_t evaluations() const { return evaluations_; }
  void AddEvaluations(int64_t n) { evaluations_ += n; }

 protected:
  double QueueSeconds() const;
  double ComputeSeconds(absl::Time now) const;

 private:
  RequestControl control_;
  absl::Time arrival_;
  absl::Time first_forward_ = absl::InfinitePast();
  int64_t evaluations_ = 0;
};

// Sampling with any sampler, with classifier-free guidance (SamplingPlan).
std::unique_ptr<Task> MakeSampleTask(SampleJob job, RequestControl control,
                                     SampleCallback done, absl::Time arrival);

// DDIM inversion of images to their latents (EncodePlan); its rows share
// batches with sampling rows.
std::unique_ptr<Task> MakeEncodeTask(EncodeJob job, RequestControl control,
                                     EncodeCallback done, absl::Time arrival);

// Per-image BPD with K stratified diffusion times (LikelihoodPlan), or with
// ScoreMethod::kOde by the probability-flow ODE (OdeLikelihoodPlan, rows
// that need VJPs).
std::unique_ptr<Task> MakeScoreTask(ScoreJob job, RequestControl control,
                                    ScoreCallback done, absl::Time arrival);

}  // namespace vdm

#endif  // VDM_SERVER_TASKS_H_
