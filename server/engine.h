// The continuous-batching engine (docs/design.md, "The engine"). Free of
// torch and gRPC in its interface: the service hands it plain jobs
// (jobs.h) and gets plain results back through callbacks.
//
// One worker per device owns a model replica. Each iteration it gathers up
// to `max_batch` rows from every live request (a sampling trajectory at its
// current step, both halves of a guided pair, a scoring evaluation at its
// own time t), runs one forward pass and advances each request. New
// requests join at the next iteration; cancelled or expired ones leave at
// the next iteration. Results, progress messages and their encoding run on
// a completion thread, so the forward loop never waits on them.
//
// Threaded (the server): one thread per worker plus the completion thread.
// Manual (tests, simulations; Options::threaded = false): no threads; the
// caller drives every iteration with Step() and callbacks run inline, so a
// test with a FakeClock and a fake Denoiser sees exactly which rows went
// into which batch.
//
// Thread-safe: Submit*, Stop, WaitIdle and the stats may be called from any
// thread; Step only in manual mode, from one thread.
#ifndef VDM_SERVER_ENGINE_H_
#define VDM_SERVER_ENGINE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/clock.h"
#include "server/jobs.h"

namespace vdm {

class CompletionQueue;
class Denoiser;
struct EvaluationCounter;
class Metrics;
class Worker;

// Where a worker's time went (seconds of its clock).
struct WorkerStats {
  int64_t batches = 0;
  int64_t rows = 0;
  double forward_seconds = 0;  // inside Denoiser::Denoise
  double host_seconds = 0;     // gathering rows, advancing tasks, retiring
};

class Engine {
 public:
  // When a worker lets queued jobs in (docs/design.md, "Admission policies").
  // The server always uses kContinuous; the others exist so that
  // vdm-batching-sim can measure continuous batching against them on the
  // same engine.
  enum class Admission {
    kContinuous,    // every iteration admits whatever has arrived
    kRequestLevel,  // only when nothing runs: a batch of requests that
                    // arrived within batch_window of the first (or until
                    // their first steps fill max_batch rows) runs to
                    // completion before the next batch is let in
    kOneAtATime,    // only when nothing runs, one job
  };
  struct Options {
    int max_batch = 64;                // rows per forward pass
    int64_t max_queued_rows = 100000;  // admitted, unfinished rows per worker
    bool score_priority = false;       // ScoreBPD rows go first in each batch
    Clock* clock = nullptr;            // null = Clock::Real()
    bool threaded = true;              // false = manual mode (see above)
    Admission admission = Admission::kContinuous;
    absl::Duration batch_window = absl::Milliseconds(5);  // kRequestLevel
  };

  // One worker per replica; `metrics` may be null and must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const Options& options,
      std::vector<std::unique_ptr<Denoiser>> replicas, Metrics* metrics);
  ~Engine();  // Stops the workers; unfinished requests fail with UNAVAILABLE.

  // Admits a job or returns at once RESOURCE_EXHAUSTED (the queue is full
  // now: retry later), INVALID_ARGUMENT (the job costs more rows than the
  // whole queue holds: it never fits) or UNAVAILABLE (stopped). The callback runs exactly once, off the worker
  // thread, unless Submit returned an error.
  absl::Status SubmitSample(SampleJob job, RequestControl control,
                            SampleCallback done);
  absl::Status SubmitScore(ScoreJob job, RequestControl control,
                           ScoreCallback done);

  // Manual mode: one iteration of every worker (admit, drop cancelled and
  // expired requests, one forward pass). Returns true when anything
  // happened, false when every worker is idle (or, under kRequestLevel,
  // holds queued jobs whose batch window is still open on the clock).
  bool Step();

  // Stops admitting, fails every unfinished request with UNAVAILABLE, joins
  // the workers and delivers every pending callback. Idempotent.
  void Stop();

  // Total rows evaluated so far (all workers).
  int64_t network_evaluations() const;
  // Blocks until no request is admitted or running and every callback has
  // run, or until `deadline` (real time). Returns true when idle.
  bool WaitIdle(absl::Time deadline);
  // Block until network_evaluations() >= rows, or until `jobs` jobs have
  // ever been admitted, or `deadline` (real time); false on the deadline.
  // For tests that must know the engine has got somewhere, without sleeping.
  bool AwaitEvaluations(int64_t rows, absl::Time deadline);
  bool AwaitAdmitted(int64_t jobs, absl::Time deadline);
  std::vector<WorkerStats> worker_stats() const;
  // Real seconds the completion thread spent delivering results.
  double completion_seconds() const;

 private:
  Engine(const Options& options, Metrics* metrics);
  Worker* LeastLoaded();
  absl::Status Admit(Worker* worker, std::unique_ptr<class Task> task,
                     int64_t rows);

  Options options_;
  std::unique_ptr<CompletionQueue> completions_;
  std::unique_ptr<EvaluationCounter> counter_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace vdm

#endif  // VDM_SERVER_ENGINE_H_
