// The one kind of thing the engine runs (docs/design.md, "The engine"): a
// Task states what it costs and how its rows are evaluated, hands out rows
// for the next forward pass and takes the network's outputs back. The engine
// knows no job kinds: sampling, encoding and scoring are Task subclasses
// (server/tasks.cc), made by the factories of server/tasks.h; the model of
// tensorflow/serving's BatchTask (`size()`) and Triton's scheduler payloads.
//
// Free of torch: Rows, Evaluation and Denoiser are only declared here, so
// the service can build and submit tasks without tensor headers; the
// engine and the tasks include model/vdm/rows.h.
//
// Not thread-safe: a task lives on one worker thread from Start until it is
// retired; Finish then runs once, on the engine's completion thread.
#ifndef VDM_SERVER_TASK_H_
#define VDM_SERVER_TASK_H_

#include <cstdint>
#include <functional>
#include <utility>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "server/jobs.h"

namespace vdm {

class Denoiser;
struct Evaluation;
struct Rows;

class Task {
 public:
  // How the rows of a task are evaluated.
  enum class Pass {
    kForward,     // a no-grad forward pass
    kForwardVjp,  // forward + backward with gradients: Rows::probe is set and
                  // Evaluation::vjp comes back (the ODE likelihood)
  };
  // What the engine needs before it starts the task.
  struct Cost {
    int64_t rows = 0;        // network rows in all: admitted against the queue
    int64_t first_pass = 0;  // rows of its first evaluation (request-level
                             // batching fills batches by it)
  };

  virtual ~Task() = default;

  virtual Cost cost() const = 0;
  virtual Pass pass() const { return Pass::kForward; }
  // Rows of a likelihood estimate: Engine::Options::score_priority gathers
  // them first, and score_fp32 keeps them in fp32 on a reduced-precision
  // replica.
  virtual bool likelihood() const { return false; }
  // The RPC, for metrics ("Sample", "ScoreBPD", ...).
  virtual const char* method() const = 0;

  // Prepares tensors (time grid, noise) on the worker thread.
  // `has_background`: the worker has a background model (the likelihood
  // ratio); a task that wants its rows evaluated there too says so in
  // wants_background() and reads Evaluation::background.
  virtual absl::Status Start(Denoiser& model, bool has_background) = 0;
  // Up to `max_rows` rows of the current evaluation (none when done or
  // waiting for rows handed out earlier).
  virtual Rows Take(int64_t max_rows) = 0;
  virtual bool wants_background() const { return false; }
  // The outputs for the rows of the last Take, in order.
  virtual absl::Status Give(const Evaluation& out) = 0;
  virtual bool done() const = 0;
  // Delivers the result (when `error` is OK and the task is done) or
  // `error` to the caller; `now` is when the task left the worker.
  virtual void Finish(absl::Status error, absl::Time now) = 0;

  // Set by the engine when it admits the task. `post` runs a closure on the
  // completion thread, in order with the task's result (progress messages).
  void Admit(RequestControl control, absl::Time arrival,
             std::function<void(std::function<void()>)> post) {
    control_ = std::move(control);
    arrival_ = arrival;
    post_ = std::move(post);
  }
  const RequestControl& control() const { return control_; }
  absl::Time arrival() const { return arrival_; }
  // Set by the worker at the first forward pass of this task.
  bool started_forward() const {
    return first_forward_ != absl::InfinitePast();
  }
  void MarkForward(absl::Time now) {
    if (!started_forward()) first_forward_ = now;
  }
  int64_t evaluations() const { return evaluations_; }
  void AddEvaluations(int64_t n) { evaluations_ += n; }

 protected:
  double QueueSeconds() const {
    return started_forward() ? absl::ToDoubleSeconds(first_forward_ - arrival_)
                             : 0;
  }
  double ComputeSeconds(absl::Time now) const {
    return started_forward() ? absl::ToDoubleSeconds(now - first_forward_) : 0;
  }
  // Runs `fn` off the worker thread, before the result (see Admit).
  void Post(std::function<void()> fn) const {
    if (post_) {
      post_(std::move(fn));
    } else {
      fn();
    }
  }

 private:
  RequestControl control_;
  absl::Time arrival_ = absl::InfinitePast();
  absl::Time first_forward_ = absl::InfinitePast();
  int64_t evaluations_ = 0;
  std::function<void(std::function<void()>)> post_;
};

}  // namespace vdm

#endif  // VDM_SERVER_TASK_H_
