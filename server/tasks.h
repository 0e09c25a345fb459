// The units of work of the engine: one Task per RPC. A task is a small state
// machine that hands out rows for the next forward pass (Take), receives the
// network's eps_hat for them (Give) and advances when all rows of its current
// step are back. Every task owns its random number generator, so its result
// does not depend on what else shares the batch.
//
// Not thread-safe: a task lives on one worker thread.
#ifndef VDM_SERVER_TASKS_H_
#define VDM_SERVER_TASKS_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "model/vdm/denoiser.h"
#include "server/engine.h"

namespace vdm {

// Rows of one task for one forward pass.
struct Rows {
  at::Tensor z;      // [m, C, H, W] f32
  at::Tensor gamma;  // [m] f32
  at::Tensor label;  // [m] i64
};

class Task {
 public:
  Task(RequestControl control, absl::Time arrival)
      : control_(std::move(control)), arrival_(arrival) {}
  virtual ~Task() = default;

  virtual bool is_score() const = 0;
  virtual const char* method() const = 0;
  // Rows this request will still evaluate (for load balancing and limits).
  virtual int64_t remaining_rows() const = 0;

  // Prepares tensors (time grid, noise) on the worker thread.
  virtual absl::Status Start(Denoiser& model) = 0;
  // Up to `max_rows` rows of the current step (none when waiting or done).
  virtual Rows Take(int64_t max_rows) = 0;
  // eps_hat for the rows of the last Take.
  virtual absl::Status Give(const at::Tensor& eps_hat) = 0;
  virtual bool done() const = 0;
  // Delivers the result (when done) or `error` to the caller. Called once.
  virtual void Finish(absl::Status error) = 0;

  const RequestControl& control() const { return control_; }
  absl::Time arrival() const { return arrival_; }
  // Set by the worker at the first forward pass of this task.
  absl::Time first_forward() const { return first_forward_; }
  void MarkForward(absl::Time now) {
    if (first_forward_ == absl::InfinitePast()) first_forward_ = now;
  }
  int64_t evaluations() const { return evaluations_; }
  void AddEvaluations(int64_t n) { evaluations_ += n; }

 private:
  RequestControl control_;
  absl::Time arrival_;
  absl::Time first_forward_ = absl::InfinitePast();
  int64_t evaluations_ = 0;
};

// DDPM / DDIM(eta) sampling with optional classifier-free guidance.
std::unique_ptr<Task> MakeSampleTask(const SampleJob& job,
                                     RequestControl control,
                                     Engine::SampleCallback done,
                                     absl::Time arrival);
// Rows a sample job costs in total (steps x images x 1 or 2).
int64_t SampleJobRows(const SampleJob& job, int num_classes);

// Per-image BPD with K stratified diffusion times.
std::unique_ptr<Task> MakeScoreTask(ScoreJob job, RequestControl control,
                                    Engine::ScoreCallback done,
                                    absl::Time arrival);

}  // namespace vdm

#endif  // VDM_SERVER_TASKS_H_
