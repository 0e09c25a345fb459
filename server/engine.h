// The continuous-batching engine (docs/design.md, "The engine"). Free of
// torch and gRPC in its interface: it runs Tasks (server/task.h), each of
// which states its own cost and how its rows are evaluated, and delivers
// their results through the tasks' own callbacks.
//
// One worker per device. A model version the engine runs (EngineModel) has
// a replica on every worker; a task is submitted with the model it runs on
// and holds it until it leaves, so a version a repository replaces keeps
// serving the requests it started and is freed after the last one. Each
// iteration a worker gathers up to `max_batch` rows of ONE model (rows of
// different models never share a forward pass; the models with live tasks
// take turns, so a busy model cannot starve another) from every live task (a sampling trajectory at its
// current step, both halves of a guided pair, a scoring evaluation at its
// own time t), runs one forward pass and advances each task. New tasks join
// at the next iteration; cancelled or expired ones leave at the next
// iteration. Results, progress messages and their encoding run on a
// completion thread, so the forward loop never waits on them.
//
// Threaded (the server): one thread per worker plus the completion thread.
// Manual (tests, simulations; Options::threaded = false): no threads; the
// caller drives every iteration with Step() and callbacks run inline, so a
// test with a fake clock and a fake Denoiser sees exactly which rows went
// into which batch.
//
// Thread-safe: Submit, Stop, WaitIdle and the stats may be called from any
// thread; Step only in manual mode, from one thread.
#ifndef VDM_SERVER_ENGINE_H_
#define VDM_SERVER_ENGINE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/admission.h"
#include "server/clock.h"
#include "server/engine_observer.h"
#include "server/jobs.h"
#include "server/task.h"

namespace vdm {

class CompletionQueue;
class Denoiser;
class Worker;

// Where a worker's time went (seconds of its clock).
struct WorkerStats {
  int64_t batches = 0;
  int64_t rows = 0;
  double forward_seconds = 0;  // inside Denoiser::Denoise
  double host_seconds = 0;     // gathering rows, advancing tasks, retiring
  // Score rows also evaluated on the background model (their time is in
  // forward_seconds; their count is not in `rows`).
  int64_t background_rows = 0;
  // Rows this worker evaluated on its replica for another, alone worker
  // (Engine::Options::lone_split; counted in that worker's `rows`).
  int64_t lent_rows = 0;
};

// A loaded model version as the engine runs it: one replica per worker
// and, optionally, a background model per worker (the likelihood ratio of
// Ren et al. 2019) of the replicas' shape and num_classes. Immutable after
// Create; shared by the tasks that run on it (see above). Thread-safe.
class EngineModel {
 public:
  static absl::StatusOr<std::shared_ptr<const EngineModel>> Create(
      std::vector<std::unique_ptr<Denoiser>> replicas,
      std::vector<std::unique_ptr<Denoiser>> background = {});
  ~EngineModel();

  int workers() const { return static_cast<int>(replicas_.size()); }
  Denoiser& replica(int worker) const { return *replicas_[worker]; }
  // The worker's background model, or null when the model has none.
  Denoiser* background(int worker) const {
    return background_.empty() ? nullptr : background_[worker].get();
  }

 private:
  EngineModel() = default;
  std::vector<std::unique_ptr<Denoiser>> replicas_;
  std::vector<std::unique_ptr<Denoiser>> background_;
};

// OK when `background` can serve as `model`'s background model (the same
// image shape and num_classes); else INVALID_ARGUMENT saying what differs.
absl::Status CheckBackgroundModel(const Denoiser& model,
                                  const Denoiser& background);

class Engine {
 public:
  struct Options {
    int max_batch = 64;                // rows per forward pass
    int64_t max_queued_rows = 100000;  // admitted, unfinished rows per worker
    // Rows of likelihood tasks (Task::likelihood: ScoreBPD) go first in
    // each batch.
    bool score_priority = false;
    // When a replica samples in reduced precision (Denoiser::precision()),
    // evaluate likelihood rows in fp32 anyway (Denoiser::DenoiseFp32): a
    // mixed batch becomes two forward passes (--score_precision=fp32).
    bool score_fp32 = true;
    // Intra-op threads of a worker's forward passes, and of a worker that
    // is alone: when lone_threads > threads and no other worker has a live
    // task, the busy worker runs its passes on lone_threads threads, so a
    // lone request uses every core; it goes back to `threads` as soon as
    // another worker has work. 0 = off (threads as SetTorchThreads left
    // them).
    int threads = 0;
    int lone_threads = 0;
    // A worker that is alone splits each plain forward pass (no VJP, not
    // the background model's) into contiguous shares, one per worker: the
    // idle workers evaluate theirs on their own replicas on their own
    // threads at the same time, so a lone request uses every device
    // (replaces lone_threads when on).
    bool lone_split = false;
    Clock* clock = nullptr;            // null = Clock::Real()
    bool threaded = true;              // false = manual mode (see above)
    // When queued tasks are let in (admission.h); null = continuous: every
    // iteration admits whatever has arrived. Must outlive the engine.
    const AdmissionPolicy* admission = nullptr;
    // Told of every event (metrics, tests); null = nobody. Must outlive
    // the engine.
    EngineObserver* observer = nullptr;
  };

  // `workers` workers and no model yet: every task is submitted with the
  // EngineModel (of `workers` replicas) it runs on.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(const Options& options,
                                                        int workers);
  // One worker per replica, and these replicas (with `background`, see
  // EngineModel) as the default model of Submit(task, control). The rows of
  // tasks that want it (Task::wants_background) are also evaluated on the
  // worker's background model, in the same iteration as on its replica.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const Options& options,
      std::vector<std::unique_ptr<Denoiser>> replicas,
      std::vector<std::unique_ptr<Denoiser>> background = {});
  ~Engine();  // Stops the workers; unfinished tasks fail with UNAVAILABLE.

  // Admits a task to the least loaded worker by its Task::cost(), or
  // returns at once RESOURCE_EXHAUSTED (the queue is full now: retry later),
  // INVALID_ARGUMENT (it costs more rows than the whole queue holds: it
  // never fits) or UNAVAILABLE (stopped). The task's Finish runs exactly
  // once, off the worker thread, unless Submit returned an error (then the
  // task is destroyed unfinished).
  absl::Status Submit(std::unique_ptr<Task> task, RequestControl control);
  // The same on `model` (it must have a replica per worker).
  absl::Status Submit(std::unique_ptr<Task> task, RequestControl control,
                      std::shared_ptr<const EngineModel> model);
  int workers() const { return static_cast<int>(workers_.size()); }

  // Manual mode: one iteration of every worker (admit, drop cancelled and
  // expired tasks, one forward pass). Returns true when anything happened,
  // false when every worker is idle (or holds queued tasks that its
  // admission policy does not let in yet, e.g. an open batch window).
  bool Step();

  // Stops admitting, fails every unfinished request with UNAVAILABLE, joins
  // the workers and delivers every pending callback. Idempotent.
  void Stop();

  // Total rows evaluated so far (all workers), background rows included.
  int64_t network_evaluations() const;
  // Blocks until no request is admitted or running and every callback has
  // run, or until `deadline` (real time). Returns true when idle.
  bool WaitIdle(absl::Time deadline);
  std::vector<WorkerStats> worker_stats() const;
  // Real seconds the completion thread spent delivering results.
  double completion_seconds() const;

 private:
  explicit Engine(const Options& options);
  Worker* LeastLoaded();

  Options options_;
  std::shared_ptr<const EngineModel> default_model_;  // may be null
  std::atomic<int> busy_workers_{0};  // workers with live tasks
  std::unique_ptr<CompletionQueue> completions_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace vdm

#endif  // VDM_SERVER_ENGINE_H_
