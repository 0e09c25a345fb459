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
  // Score rows also evaluated on the background model (their time is in
  // forward_seconds; their count is not in `rows`).
  int64_t background_rows = 0;
};

// OK when `background` can serve as `model`'s background model (the same
// image shape and num_classes); else INVALID_ARGUMENT saying what differs.
absl::Status CheckBackgroundModel(const Denoiser& model,
                                  const Denoiser& background);

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
    // When a replica samples in reduced precision (Denoiser::precision()),
    // evaluate ScoreBPD rows in fp32 anyway (Denoiser::DenoiseFp32): a mixed
    // batch becomes two forward passes (--score_precision=fp32).
    bool score_fp32 = true;
    Clock* clock = nullptr;            // null = Clock::Real()
    bool threaded = true;              // false = manual mode (see above)
    Admission admission = Admission::kContinuous;
    absl::Duration batch_window = absl::Milliseconds(5);  // kRequestLevel
  };

  // One worker per replica; `metrics` may be null and must outlive the engine.
  // `background`: empty, or one background model per replica (the
  // likelihood ratio of Ren et al. 2019), of the replicas' shape and
  // num_classes: each ScoreBPD row is then also evaluated on the worker's
  // background model, in the same iteration as on its replica, and the
  // result carries background_bpd.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const Options& options,
      std::vector<std::unique_ptr<Denoiser>> replicas, Metrics* metrics,
      std::vector<std::unique_ptr<Denoiser>> background = {});
  ~Engine();  // Stops the workers; unfinished requests fail with UNAVAILABLE.

  // Admits a job or returns at once RESOURCE_EXHAUSTED (the queue is full
  // now: retry later), INVALID_ARGUMENT (the job costs more rows than the
  // whole queue holds: it never fits) or UNAVAILABLE (stopped). The callback runs exactly once, off the worker
  // thread, unless Submit returned an error.
  absl::Status SubmitSample(SampleJob job, RequestControl control,
                            SampleCallback done);
  absl::Status SubmitScore(ScoreJob job, RequestControl control,
                           ScoreCallback done);
  // Encode (DDIM inversion): its rows are batched like sampling rows.
  absl::Status SubmitEncode(EncodeJob job, RequestControl control,
                            EncodeCallback done);

  // Manual mode: one iteration of every worker (admit, drop cancelled and
  // expired requests, one forward pass). Returns true when anything
  // happened, false when every worker is idle (or, under kRequestLevel,
  // holds queued jobs whose batch window is still open on the clock).
  bool Step();

  // Stops admitting, fails every unfinished request with UNAVAILABLE, joins
  // the workers and delivers every pending callback. Idempotent.
  void Stop();

  // Total rows evaluated so far (all workers), background rows included.
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
  bool has_background_ = false;
  std::unique_ptr<CompletionQueue> completions_;
  std::unique_ptr<EvaluationCounter> counter_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace vdm

#endif  // VDM_SERVER_ENGINE_H_
