#include "server/engine.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <malloc.h>
#include <torch/script.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/rows.h"
#include "model/vdm/status_macros.h"

namespace vdm {

// Runs closures in order, on one thread of its own (threaded mode) or at
// once on the caller's thread (manual mode). One thread keeps every
// request's progress messages before its result.
class CompletionQueue {
 public:
  CompletionQueue(bool threaded, EngineObserver* observer)
      : observer_(observer) {
    if (threaded) thread_ = std::thread([this] { Run(); });
  }
  ~CompletionQueue() { Stop(); }

  void Post(std::function<void()> fn) {
    if (!thread_.joinable()) {
      fn();
      return;
    }
    absl::MutexLock lock(&mu_);
    queue_.push_back(std::move(fn));
  }

  // Runs what is queued, then joins the thread. Idempotent.
  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

  double busy_seconds() {
    absl::MutexLock lock(&mu_);
    return busy_seconds_;
  }

  bool WaitEmpty(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    auto empty = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return queue_.empty() && running_ == 0;
    };
    return mu_.AwaitWithDeadline(absl::Condition(&empty), deadline);
  }

 private:
  void Run() {
    absl::MutexLock lock(&mu_);
    while (true) {
      auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return stopping_ || !queue_.empty();
      };
      mu_.Await(absl::Condition(&ready));
      if (queue_.empty()) return;  // stopping and drained
      std::function<void()> fn = std::move(queue_.front());
      queue_.pop_front();
      ++running_;
      mu_.Unlock();
      const absl::Time start = absl::Now();
      fn();
      // Hand memory freed by finished requests back to the system, at most
      // once a second: glibc keeps freed memory in its per-thread arenas,
      // and without this the resident size creeps up under varied load.
      const absl::Time now = absl::Now();
      if (now - last_trim_ >= absl::Seconds(1)) {
        malloc_trim(0);
        last_trim_ = now;
      }
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
      observer_->OnCompletionSeconds(seconds);
      mu_.Lock();
      busy_seconds_ += seconds;
      --running_;
    }
  }

  EngineObserver* const observer_;
  absl::Time last_trim_ = absl::InfinitePast();  // completion thread only
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  int running_ ABSL_GUARDED_BY(mu_) = 0;
  double busy_seconds_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

constexpr absl::Duration kDeadlineSlack = absl::Milliseconds(250);

// A row with a vector-Jacobian product (forward + backward) counts as this
// many rows of max_batch.
constexpr int64_t kVjpRowCost = 3;

EngineObserver* NoObserver() {
  static EngineObserver* const nobody = new EngineObserver();
  return nobody;
}

// A share of a lone worker's plain pass that an idle worker evaluates on its
// own replica of the same model (Engine::Options::lone_split). The poster
// hands it out, evaluates its own share, then collects: a job no peer has
// claimed by then is withdrawn and evaluated by the poster itself, so a
// busy, stopping or slow peer never holds a pass up by more than the share
// it already started.
struct HelpJob {
  enum class State { kPosted, kClaimed, kDone, kWithdrawn };
  HelpJob(const EngineModel* m, Rows r, bool exact)
      : model(m), rows(std::move(r)), fp32(exact) {}
  const EngineModel* const model;
  const Rows rows;
  const bool fp32;
  absl::Mutex mu;
  State state ABSL_GUARDED_BY(mu) = State::kPosted;
  absl::StatusOr<at::Tensor> eps ABSL_GUARDED_BY(mu);
};

// eps_hat of `rows` on `model` (a plain no-grad pass; Forward's errors as
// statuses, never an exception), on the CPU.
absl::StatusOr<at::Tensor> EvaluateOnCpu(Denoiser& model, const Rows& rows,
                                         bool fp32) {
  try {
    torch::NoGradGuard no_grad;
    absl::StatusOr<at::Tensor> eps = Evaluate(model, rows, fp32);
    if (!eps.ok()) return eps;
    return eps->to(at::kCPU);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("forward pass: ", e.what()));
  }
}

// One device: the loop that batches for the replicas it holds of every
// model (EngineModel::replica(index)). Admit, load, WaitIdle, Stop and
// stats are thread-safe; everything else runs on the worker's thread (or the
// manual caller's).
class Worker {
 public:
  Worker(int index, const Engine::Options& options,
         CompletionQueue* completions, std::atomic<int>* busy_workers,
         const std::vector<std::unique_ptr<Worker>>* peers)
      : index_(index), options_(options), observer_(options.observer),
        completions_(completions), busy_workers_(busy_workers),
        peers_(peers) {
    if (options_.threaded) thread_ = std::thread([this] { Run(); });
  }
  ~Worker() { Stop(); }

  absl::Status Admit(std::unique_ptr<Task> task, const Task::Cost& cost,
                     std::shared_ptr<const EngineModel> model) {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("server is shutting down");
    if (cost.rows > options_.max_queued_rows) {
      // Not retryable: it would not fit into an empty queue either.
      return absl::InvalidArgumentError(absl::StrCat(
          "request too large: ", cost.rows, " network rows, more than the "
          "queue holds (", options_.max_queued_rows, ")"));
    }
    if (queued_rows_ + cost.rows > options_.max_queued_rows) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "queue full: ", queued_rows_, " rows admitted, limit ",
          options_.max_queued_rows, "; retry later"));
    }
    queued_rows_ += cost.rows;
    observer_->OnAdmitted(task->method());
    incoming_.push_back(
        {std::move(task), std::move(model), cost.rows, cost.first_pass});
    return absl::OkStatus();
  }

  int64_t load() const {
    absl::MutexLock lock(&mu_);
    return queued_rows_;
  }
  bool WaitIdle(absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    auto idle = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return queued_rows_ == 0;
    };
    return mu_.AwaitWithDeadline(absl::Condition(&idle), deadline);
  }
  WorkerStats stats() const {
    absl::MutexLock lock(&mu_);
    return stats_;
  }
  // Hands this worker a share of another's pass (see HelpJob); it is taken
  // up only while this worker waits for work of its own. Replaces a job
  // left from an earlier pass (its poster has withdrawn it by now).
  void Offer(std::shared_ptr<HelpJob> job) {
    absl::MutexLock lock(&mu_);
    help_ = std::move(job);
  }

  // One iteration (see Engine::Step).
  bool Step() {
    const absl::Time start = Now();
    return Iterate(start, TakeIncoming(/*wait=*/false));
  }

  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (thread_.joinable()) {
      thread_.join();  // Run fails what is left
    } else if (!options_.threaded) {
      FailAll();
    }
  }

 private:
  struct Entry {
    std::unique_ptr<Task> task;
    std::shared_ptr<const EngineModel> model;  // what its rows run on
    int64_t rows;        // admitted cost, released when the task leaves
    int64_t first_pass;  // rows of its first evaluation
  };
  // The rows of one forward pass: which live task gave how many, in order.
  struct Batch {
    const EngineModel* model = nullptr;  // every part's task runs on it
    Task::Pass pass = Task::Pass::kForward;
    std::vector<std::pair<size_t, int64_t>> parts;  // live_ index, rows
    std::vector<Rows> rows;
    int64_t taken = 0;
    // Rows of the parts whose task wants them on the background model, and
    // the offset of each part among them (-1: not wanted).
    std::vector<int64_t> background_offset;
    absl::StatusOr<at::Tensor> background = at::Tensor();
  };

  void Run() {
    while (TakeIncoming(/*wait=*/true)) Iterate(Now(), /*took=*/false);
    FailAll();
  }
  void FailAll();
  // Moves admissible tasks into the live set and starts them. With `wait`
  // (threaded): first waits for work when nothing is live; returns false
  // when the worker must stop. Without: returns whether any were let in.
  bool TakeIncoming(bool wait);
  // How many of incoming_ the admission policy lets in now.
  size_t Admissible(bool wait) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One iteration after TakeIncoming (see Engine::Step).
  bool Iterate(absl::Time start, bool took);
  bool Sweep();
  // Gathers, evaluates and hands out one batch; adds its forward time.
  bool RunBatch(double* forward_seconds);
  Batch Gather();
  // The batch of `model`'s tasks (in `order`), or an empty one.
  Batch GatherModel(const EngineModel* model, const std::vector<size_t>& order);
  Batch GatherPass(const EngineModel* model, Task::Pass pass,
                   const std::vector<size_t>& order);
  // The outputs of the batch's rows (the background model's in
  // batch.background); records the pass.
  absl::StatusOr<Evaluation> Forward(Batch& batch, double* forward_seconds);
  // eps_hat of a plain batch, in order; with Options::score_fp32 and a
  // reduced-precision replica, likelihood rows in an fp32 pass of their own
  // (batch.parts and batch.rows are reordered, those first, to match).
  absl::StatusOr<at::Tensor> EvaluatePlain(Batch& batch);
  void RunBackground(Batch& batch, double* forward_seconds);
  // Gives every task its outputs and retires the finished ones.
  void Distribute(const Batch& batch, const absl::StatusOr<Evaluation>& out,
                  absl::Time start);
  void Retire(size_t index, absl::Status status);
  void UpdateGauges();
  void AddLentRows(int64_t rows) {
    absl::MutexLock lock(&mu_);
    stats_.lent_rows += rows;
  }
  // Counts this worker in busy_workers_ while it has live tasks, and picks
  // its forward passes' threads (Options::lone_threads).
  void UpdateBusy();
  void PickThreads();
  // eps_hat of `rows` on `model`: on this worker's replica, or, when this
  // worker is alone and Options::lone_split is on, in shares across every
  // worker's replica at once (the shares in row order).
  absl::StatusOr<at::Tensor> EvaluateShared(const EngineModel& model,
                                            const Rows& rows, bool fp32);
  // Runs a share another worker offered (on this worker's thread).
  void Help(HelpJob& job);
  absl::Time Now() const { return options_.clock->Now(); }

  const int index_;
  const Engine::Options options_;
  EngineObserver* const observer_;
  CompletionQueue* const completions_;
  std::atomic<int>* const busy_workers_;
  const std::vector<std::unique_ptr<Worker>>* const peers_;  // all workers

  mutable absl::Mutex mu_;
  std::deque<Entry> incoming_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<HelpJob> help_ ABSL_GUARDED_BY(mu_);  // offered, unclaimed
  int64_t queued_rows_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  WorkerStats stats_ ABSL_GUARDED_BY(mu_);

  // Worker thread only.
  std::vector<Entry> live_;
  size_t rotation_ = 0;  // where the next batch starts gathering rows
  size_t model_turn_ = 0;  // which model's rows the next batch tries first
  bool vjp_turn_ = false;  // alternates plain and VJP batches
  bool busy_ = false;      // counted in busy_workers_
  int threads_now_ = 0;    // what PickThreads last set (0 = untouched)
  std::thread thread_;
};

bool Worker::Iterate(absl::Time start, bool took) {
  bool worked = Sweep();
  UpdateBusy();
  double forward = 0;
  worked = RunBatch(&forward) || worked;
  UpdateBusy();
  UpdateGauges();
  // Host time: the whole iteration (from after the wait for work) but the
  // forward pass.
  const double host = absl::ToDoubleSeconds(Now() - start) - forward;
  observer_->OnWorkerSeconds(index_, forward, host);
  absl::MutexLock lock(&mu_);
  stats_.host_seconds += host;
  return took || worked;
}

void Worker::FailAll() {
  while (!live_.empty()) {
    Retire(live_.size() - 1, absl::UnavailableError("server is shutting down"));
  }
  std::deque<Entry> rest;
  {
    absl::MutexLock lock(&mu_);
    rest.swap(incoming_);
  }
  for (Entry& e : rest) {
    live_.push_back(std::move(e));
    Retire(live_.size() - 1, absl::UnavailableError("server is shutting down"));
  }
}

bool Worker::TakeIncoming(bool wait) {
  std::deque<Entry> fresh;
  while (true) {
    std::shared_ptr<HelpJob> help;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return stopping_ || !incoming_.empty() || help_ != nullptr;
      };
      if (wait && live_.empty()) mu_.Await(absl::Condition(&ready));
      if (wait && stopping_) return false;
      // Idle with a share offered: the poster waits for it, so it goes
      // before this worker's own new work.
      if (wait && live_.empty() && help_ != nullptr) {
        help = std::move(help_);
        help_ = nullptr;
      } else {
        for (size_t n = Admissible(wait); n > 0; --n) {
          fresh.push_back(std::move(incoming_.front()));
          incoming_.pop_front();
        }
      }
    }
    if (help == nullptr) break;
    Help(*help);
  }
  const bool took = !fresh.empty();
  for (Entry& e : fresh) {
    absl::Status started;
    try {
      started = e.task->Start(e.model->replica(index_),
                              e.model->background(index_) != nullptr);
    } catch (const std::exception& err) {
      started = absl::InternalError(
          absl::StrCat("cannot start request: ", err.what()));
    }
    live_.push_back(std::move(e));
    if (!started.ok()) Retire(live_.size() - 1, started);
  }
  return wait || took;
}

size_t Worker::Admissible(bool wait) {
  if (options_.admission == nullptr) return incoming_.size();
  while (true) {
    std::vector<QueuedTask> queued;
    for (const Entry& e : incoming_) {
      queued.push_back({e.task->arrival(), e.first_pass});
    }
    absl::Time recheck = absl::InfiniteFuture();
    const size_t n =
        options_.admission->Admit(queued, live_.size(), Now(), &recheck);
    if (n > 0 || !wait || stopping_ || !live_.empty() ||
        recheck == absl::InfiniteFuture()) {
      return std::min(n, incoming_.size());
    }
    // Threaded with nothing live: wait (real time) until the policy's time
    // or until more arrive, then ask again.
    const size_t seen = incoming_.size();
    auto changed = [this, seen]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return stopping_ || incoming_.size() != seen;
    };
    mu_.AwaitWithTimeout(absl::Condition(&changed), recheck - Now());
  }
}

// Removes cancelled and expired tasks before they cost another row.
bool Worker::Sweep() {
  const absl::Time now = Now();
  bool removed = false;
  for (size_t i = live_.size(); i-- > 0;) {
    const RequestControl& c = live_[i].task->control();
    // The deadline first: gRPC also marks a call whose deadline passed as
    // cancelled, and the caller saw DEADLINE_EXCEEDED. gRPC's timer and our
    // clock may disagree by a little, so a cancellation within
    // kDeadlineSlack of the deadline counts as the deadline.
    const bool cancelled = c.is_cancelled && c.is_cancelled();
    if (now >= c.deadline ||
        (cancelled && c.deadline != absl::InfiniteFuture() &&
         now >= c.deadline - kDeadlineSlack)) {
      observer_->OnCancelled("deadline");
      Retire(i, absl::DeadlineExceededError(
                    "deadline expired before the request finished"));
      removed = true;
    } else if (cancelled) {
      observer_->OnCancelled("cancelled");
      Retire(i, absl::CancelledError("request cancelled by the client"));
      removed = true;
    }
  }
  return removed;
}

void Worker::UpdateBusy() {
  const bool busy = !live_.empty();
  if (busy != busy_) {
    busy_workers_->fetch_add(busy ? 1 : -1);
    busy_ = busy;
  }
}

void Worker::PickThreads() {
  if (options_.lone_threads <= options_.threads || options_.threads <= 0 ||
      options_.lone_split) {
    return;
  }
  // Alone: no other worker has a live task (this one has).
  const bool alone = busy_workers_->load() <= 1;
  const int want = alone ? options_.lone_threads : options_.threads;
  if (want == threads_now_) return;
  // The calling thread's OpenMP team size (at::set_num_threads sets the
  // caller's omp nthreads); the other workers' teams are their own.
  at::set_num_threads(want);
  threads_now_ = want;
}

bool Worker::RunBatch(double* forward_seconds) {
  if (live_.empty()) return false;
  Batch batch = Gather();
  if (batch.parts.empty()) return false;
  PickThreads();
  const absl::Time start = Now();
  const absl::StatusOr<Evaluation> out = Forward(batch, forward_seconds);
  Distribute(batch, out, start);
  return true;
}

// Which rows go into this iteration's pass. A pass holds the rows of one
// model; when tasks of several models are live, the models take turns (in
// a fixed order, so each gets every n-th pass whatever its task count). The
// starting task rotates every iteration so every task gets rows even when
// one alone could fill the batch; likelihood tasks go first with
// Options::score_priority.
Worker::Batch Worker::Gather() {
  std::vector<size_t> order(live_.size());
  for (size_t i = 0; i < order.size(); ++i) {
    order[i] = (rotation_ + i) % live_.size();
  }
  ++rotation_;
  if (options_.score_priority) {
    std::stable_partition(order.begin(), order.end(), [this](size_t i) {
      return live_[i].task->likelihood();
    });
  }
  std::vector<const EngineModel*> models;
  for (const Entry& e : live_) models.push_back(e.model.get());
  std::sort(models.begin(), models.end(), std::less<const EngineModel*>());
  models.erase(std::unique(models.begin(), models.end()), models.end());
  for (size_t j = 0; j < models.size(); ++j) {
    const size_t turn = (model_turn_ + j) % models.size();
    Batch batch = GatherModel(models[turn], order);
    if (!batch.parts.empty()) {
      model_turn_ = turn + 1;
      return batch;
    }
  }
  return Batch{};
}

// Rows that need a vector-Jacobian product (Task::Pass::kForwardVjp) run in
// a pass of their own, where a row costs about kVjpRowCost plain rows: when
// both kinds are live, iterations alternate.
Worker::Batch Worker::GatherModel(const EngineModel* model,
                                  const std::vector<size_t>& order) {
  bool any_vjp = false, any_plain = false;
  for (const Entry& e : live_) {
    if (e.model.get() != model) continue;
    (e.task->pass() == Task::Pass::kForwardVjp ? any_vjp : any_plain) = true;
  }
  if (any_vjp && any_plain) vjp_turn_ = !vjp_turn_;
  const Task::Pass first = any_vjp && (!any_plain || vjp_turn_)
                               ? Task::Pass::kForwardVjp
                               : Task::Pass::kForward;
  Batch batch = GatherPass(model, first, order);
  if (batch.parts.empty() && any_vjp && any_plain) {  // none of them ready
    batch = GatherPass(model,
                       first == Task::Pass::kForward ? Task::Pass::kForwardVjp
                                                     : Task::Pass::kForward,
                       order);
  }
  return batch;
}

Worker::Batch Worker::GatherPass(const EngineModel* model, Task::Pass pass,
                                 const std::vector<size_t>& order) {
  Batch batch;
  batch.model = model;
  batch.pass = pass;
  const int64_t capacity =
      pass == Task::Pass::kForwardVjp
          ? std::max<int64_t>(1, options_.max_batch / kVjpRowCost)
          : options_.max_batch;
  for (size_t i : order) {
    if (batch.taken == capacity) break;
    if (live_[i].model.get() != model || live_[i].task->pass() != pass) {
      continue;
    }
    Rows r = live_[i].task->Take(capacity - batch.taken);
    if (r.empty()) continue;
    batch.taken += r.size();
    batch.parts.emplace_back(i, r.size());
    batch.rows.push_back(std::move(r));
  }
  return batch;
}

absl::StatusOr<Evaluation> Worker::Forward(Batch& batch,
                                           double* forward_seconds) {
  const absl::Time start = Now();
  absl::StatusOr<Evaluation> out;
  try {
    if (batch.pass == Task::Pass::kForwardVjp) {
      absl::StatusOr<EpsVjp> both = EvaluateVjp(
          batch.model->replica(index_), Rows::Cat(batch.rows));
      if (both.ok()) {
        out = Evaluation{both->eps.to(at::kCPU), both->vjp.to(at::kCPU), {}};
      } else {
        out = both.status();
      }
    } else {
      torch::NoGradGuard no_grad;
      absl::StatusOr<at::Tensor> eps = EvaluatePlain(batch);
      if (eps.ok()) {
        out = Evaluation{eps->to(at::kCPU), {}, {}};  // once per batch
      } else {
        out = eps.status();
      }
    }
  } catch (const std::exception& e) {
    out = absl::InternalError(absl::StrCat(
        batch.pass == Task::Pass::kForwardVjp ? "forward+backward pass: "
                                              : "forward pass: ",
        e.what()));
  }
  const double forward = absl::ToDoubleSeconds(Now() - start);
  *forward_seconds += forward;
  {
    absl::MutexLock lock(&mu_);
    stats_.batches += 1;
    stats_.rows += batch.taken;
    stats_.forward_seconds += forward;
  }
  observer_->OnBatch(static_cast<int>(batch.taken), options_.max_batch,
                     forward);
  observer_->OnEvaluated(batch.taken);
  RunBackground(batch, forward_seconds);
  return out;
}

absl::StatusOr<at::Tensor> Worker::EvaluatePlain(Batch& batch) {
  const EngineModel& shared = *batch.model;
  Denoiser& model = shared.replica(index_);
  if (!options_.score_fp32 || model.precision() == Precision::kFp32) {
    return EvaluateShared(shared, Rows::Cat(batch.rows), /*fp32=*/false);
  }
  std::vector<size_t> order(batch.parts.size());
  for (size_t j = 0; j < order.size(); ++j) order[j] = j;
  const auto exact = [&](size_t j) {
    return live_[batch.parts[j].first].task->likelihood();
  };
  const size_t n_exact = static_cast<size_t>(
      std::stable_partition(order.begin(), order.end(), exact) -
      order.begin());
  if (n_exact == 0) {
    return EvaluateShared(shared, Rows::Cat(batch.rows), /*fp32=*/false);
  }
  if (n_exact == order.size()) {
    return EvaluateShared(shared, Rows::Cat(batch.rows), /*fp32=*/true);
  }
  std::vector<std::pair<size_t, int64_t>> sorted_parts;
  std::vector<Rows> sorted_rows;
  for (size_t k = 0; k < order.size(); ++k) {
    sorted_parts.push_back(batch.parts[order[k]]);
    sorted_rows.push_back(std::move(batch.rows[order[k]]));
  }
  batch.parts = std::move(sorted_parts);
  batch.rows = std::move(sorted_rows);  // the background model reads them after
  const std::vector<Rows> exact_rows(batch.rows.begin(),
                                     batch.rows.begin() + n_exact);
  const std::vector<Rows> other_rows(batch.rows.begin() + n_exact,
                                     batch.rows.end());
  absl::StatusOr<at::Tensor> exact_eps =
      EvaluateShared(shared, Rows::Cat(exact_rows), /*fp32=*/true);
  if (!exact_eps.ok()) return exact_eps;
  absl::StatusOr<at::Tensor> other_eps =
      EvaluateShared(shared, Rows::Cat(other_rows), /*fp32=*/false);
  if (!other_eps.ok()) return other_eps;
  return at::cat({exact_eps->to(at::kCPU), other_eps->to(at::kCPU)});
}

absl::StatusOr<at::Tensor> Worker::EvaluateShared(const EngineModel& model,
                                                  const Rows& rows, bool fp32) {
  std::vector<Worker*> helpers;
  if (options_.lone_split && busy_workers_->load() <= 1) {
    for (const auto& w : *peers_) {
      if (w.get() != this) helpers.push_back(w.get());
    }
  }
  const int64_t n = rows.size();
  const int64_t shares =
      std::min<int64_t>(n, 1 + static_cast<int64_t>(helpers.size()));
  Denoiser& own = model.replica(index_);
  if (shares <= 1) return Evaluate(own, rows, fp32);
  // Contiguous shares, this worker's first; a row's share never changes
  // its output but for rounding (docs/reproducibility.md).
  const int64_t each = (n + shares - 1) / shares;
  std::vector<std::shared_ptr<HelpJob>> jobs;
  for (int64_t begin = each; begin < n; begin += each) {
    auto job = std::make_shared<HelpJob>(
        &model, rows.Slice(begin, std::min(each, n - begin)), fp32);
    if (options_.threaded) helpers[jobs.size()]->Offer(job);
    jobs.push_back(std::move(job));
  }
  std::vector<at::Tensor> parts;
  absl::StatusOr<at::Tensor> mine = EvaluateOnCpu(own, rows.Slice(0, each), fp32);
  absl::Status status = mine.status();
  if (mine.ok()) parts.push_back(*std::move(mine));
  for (size_t k = 0; k < jobs.size(); ++k) {
    HelpJob& job = *jobs[k];
    absl::StatusOr<at::Tensor> eps;
    bool withdrawn = false;
    {
      absl::MutexLock lock(&job.mu);
      if (job.state == HelpJob::State::kPosted) {
        job.state = HelpJob::State::kWithdrawn;
        withdrawn = true;
      } else {
        auto done = [&job]() ABSL_SHARED_LOCKS_REQUIRED(job.mu) {
          return job.state == HelpJob::State::kDone;
        };
        job.mu.Await(absl::Condition(&done));
        eps = std::move(job.eps);
      }
    }
    if (withdrawn) {
      // Manual mode has no helper threads: the helper's replica runs here,
      // in turn (tests see which replica took which share).
      Denoiser& replica =
          options_.threaded ? own : model.replica(helpers[k]->index_);
      eps = EvaluateOnCpu(replica, job.rows, job.fp32);
      if (!options_.threaded) helpers[k]->AddLentRows(job.rows.size());
    }
    if (status.ok()) status = eps.status();
    if (status.ok()) parts.push_back(*std::move(eps));
  }
  if (!status.ok()) return status;
  return at::cat(parts);
}

void Worker::Help(HelpJob& job) {
  {
    absl::MutexLock lock(&job.mu);
    if (job.state != HelpJob::State::kPosted) return;  // withdrawn already
    job.state = HelpJob::State::kClaimed;
  }
  // This thread's team as under load (PickThreads may have left it larger).
  if (options_.threads > 0 && at::get_num_threads() != options_.threads) {
    at::set_num_threads(options_.threads);
    threads_now_ = options_.threads;
  }
  absl::StatusOr<at::Tensor> eps =
      EvaluateOnCpu(job.model->replica(index_), job.rows, job.fp32);
  AddLentRows(job.rows.size());
  absl::MutexLock lock(&job.mu);
  job.eps = std::move(eps);
  job.state = HelpJob::State::kDone;
}

// The rows of the batch's tasks that want them, once more on the
// background model (the likelihood ratio), in one pass.
void Worker::RunBackground(Batch& batch, double* forward_seconds) {
  batch.background_offset.assign(batch.parts.size(), -1);
  Denoiser* background = batch.model->background(index_);
  if (background == nullptr) return;
  std::vector<Rows> wanted;
  int64_t rows = 0;
  for (size_t k = 0; k < batch.parts.size(); ++k) {
    if (!live_[batch.parts[k].first].task->wants_background()) continue;
    batch.background_offset[k] = rows;
    rows += batch.parts[k].second;
    wanted.push_back(batch.rows[k]);
  }
  if (wanted.empty()) return;
  const absl::Time start = Now();
  {
    torch::NoGradGuard no_grad;
    try {
      batch.background =
          Evaluate(*background, Rows::Cat(wanted), options_.score_fp32);
      if (batch.background.ok()) {
        *batch.background = batch.background->to(at::kCPU);
      }
    } catch (const std::exception& e) {
      batch.background = absl::InternalError(
          absl::StrCat("background model forward pass: ", e.what()));
    }
  }
  const double forward = absl::ToDoubleSeconds(Now() - start);
  *forward_seconds += forward;
  {
    absl::MutexLock lock(&mu_);
    stats_.background_rows += rows;
    stats_.forward_seconds += forward;
  }
  observer_->OnEvaluated(rows);
}

void Worker::Distribute(const Batch& batch,
                        const absl::StatusOr<Evaluation>& out,
                        absl::Time start) {
  int64_t offset = 0;
  std::vector<std::pair<size_t, absl::Status>> finished;
  for (size_t k = 0; k < batch.parts.size(); ++k) {
    const auto [i, m] = batch.parts[k];
    Task& task = *live_[i].task;
    if (!task.started_forward()) {
      observer_->OnQueueTime(task.method(),
                             absl::ToDoubleSeconds(start - task.arrival()));
    }
    task.MarkForward(start);
    const int64_t background_at = batch.background_offset[k];
    task.AddEvaluations(background_at >= 0 ? 2 * m : m);
    absl::Status given = out.status();
    if (given.ok() && background_at >= 0) given = batch.background.status();
    if (given.ok()) {
      Evaluation part = out->Slice(offset, m);
      if (background_at >= 0) {
        part.background = batch.background->narrow(0, background_at, m);
      }
      try {
        given = task.Give(part);
      } catch (const std::exception& e) {
        given = absl::InternalError(absl::StrCat("request step: ", e.what()));
      }
    }
    offset += m;
    if (!given.ok() || task.done()) finished.emplace_back(i, given);
  }
  // Retire from the back so the remaining indices stay valid.
  std::sort(finished.begin(), finished.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  for (auto& [i, status] : finished) Retire(i, std::move(status));
}

// Takes live_[index] out, releases its admitted rows and hands it to the
// completion queue, which delivers the result (status OK) or the error.
void Worker::Retire(size_t index, absl::Status status) {
  Entry entry = std::move(live_[index]);
  live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(index));
  // Uncounted before the result is delivered: a caller that sends its next
  // request on seeing this one's result finds this worker idle, so a lone
  // request always runs with the lone thread count (its rounding, and so
  // its result, depends on the threads; docs/reproducibility.md).
  UpdateBusy();
  const absl::Time now = Now();
  std::shared_ptr<Task> task(std::move(entry.task));
  completions_->Post([task, status = std::move(status), now]() mutable {
    try {
      task->Finish(std::move(status), now);
    } catch (const std::exception& err) {
      task->Finish(absl::InternalError(err.what()), now);
    }
  });
  // The rows are released after the result is posted, so that WaitIdle
  // (queued rows 0) finds every result on its way.
  absl::MutexLock lock(&mu_);
  queued_rows_ -= entry.rows;
}

void Worker::UpdateGauges() {
  absl::MutexLock lock(&mu_);
  observer_->OnWorkerLoad(index_, static_cast<double>(incoming_.size()),
                          static_cast<double>(live_.size()),
                          static_cast<double>(queued_rows_));
}

// ---------------------------------------------------------------------------

absl::Status CheckBackgroundModel(const Denoiser& model,
                                  const Denoiser& background) {
  const ImageShape a = model.shape(), b = background.shape();
  if (a.channels != b.channels || a.height != b.height || a.width != b.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "background model: its images are ", b.channels, "x", b.height, "x",
        b.width, ", the model's ", a.channels, "x", a.height, "x", a.width,
        " (it must have the model's shape)"));
  }
  if (model.num_classes() != background.num_classes()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "background model: ", background.num_classes(), " classes, the "
        "model ", model.num_classes(), " (it must have the model's "
        "num_classes)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const EngineModel>> EngineModel::Create(
    std::vector<std::unique_ptr<Denoiser>> replicas,
    std::vector<std::unique_ptr<Denoiser>> background) {
  if (replicas.empty()) {
    return absl::InvalidArgumentError("engine needs at least one model replica");
  }
  if (!background.empty()) {
    if (background.size() != replicas.size()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "background model: ", background.size(), " replicas for ",
          replicas.size(), " model replicas"));
    }
    for (size_t i = 0; i < background.size(); ++i) {
      VDM_RETURN_IF_ERROR(CheckBackgroundModel(*replicas[i], *background[i]));
    }
  }
  std::shared_ptr<EngineModel> model(new EngineModel());
  model->replicas_ = std::move(replicas);
  model->background_ = std::move(background);
  return model;
}

EngineModel::~EngineModel() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(const Options& options,
                                                       int workers) {
  if (workers < 1) {
    return absl::InvalidArgumentError("engine needs at least one worker");
  }
  if (options.max_batch < 1) {
    return absl::InvalidArgumentError("max_batch must be >= 1");
  }
  std::unique_ptr<Engine> engine(new Engine(options));
  for (int i = 0; i < workers; ++i) {
    engine->workers_.push_back(std::make_unique<Worker>(
        i, engine->options_, engine->completions_.get(),
        &engine->busy_workers_, &engine->workers_));
  }
  return engine;
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const Options& options, std::vector<std::unique_ptr<Denoiser>> replicas,
    std::vector<std::unique_ptr<Denoiser>> background) {
  VDM_ASSIGN_OR_RETURN(
      std::shared_ptr<const EngineModel> model,
      EngineModel::Create(std::move(replicas), std::move(background)));
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<Engine> engine,
                       Create(options, model->workers()));
  engine->default_model_ = std::move(model);
  return engine;
}

Engine::Engine(const Options& options) : options_(options) {
  if (options_.clock == nullptr) options_.clock = Clock::Real();
  if (options_.observer == nullptr) options_.observer = NoObserver();
  completions_ =
      std::make_unique<CompletionQueue>(options_.threaded, options_.observer);
}

Engine::~Engine() { Stop(); }

void Engine::Stop() {
  for (auto& w : workers_) w->Stop();
  completions_->Stop();
}

bool Engine::Step() {
  bool worked = false;
  for (auto& w : workers_) worked = w->Step() || worked;
  return worked;
}

Worker* Engine::LeastLoaded() {
  Worker* best = workers_.front().get();
  int64_t best_load = best->load();
  for (auto& w : workers_) {
    const int64_t load = w->load();
    if (load < best_load) best = w.get(), best_load = load;
  }
  return best;
}

absl::Status Engine::Submit(std::unique_ptr<Task> task,
                            RequestControl control) {
  if (default_model_ == nullptr) {
    return absl::FailedPreconditionError(
        "engine has no default model: submit with the model to run on");
  }
  return Submit(std::move(task), std::move(control), default_model_);
}

absl::Status Engine::Submit(std::unique_ptr<Task> task, RequestControl control,
                            std::shared_ptr<const EngineModel> model) {
  if (task == nullptr) return absl::InvalidArgumentError("no task");
  if (model == nullptr || model->workers() != workers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model has ", model == nullptr ? 0 : model->workers(),
        " replicas for ", workers(), " workers"));
  }
  const Task::Cost cost = task->cost();
  // Progress goes through the completion queue too: off the worker, and in
  // order with the result.
  CompletionQueue* queue = completions_.get();
  task->Admit(std::move(control), options_.clock->Now(),
              [queue](std::function<void()> fn) { queue->Post(std::move(fn)); });
  return LeastLoaded()->Admit(std::move(task), cost, std::move(model));
}

bool Engine::WaitIdle(absl::Time deadline) {
  bool idle = true;
  for (auto& w : workers_) idle = w->WaitIdle(deadline) && idle;
  return completions_->WaitEmpty(deadline) && idle;
}

int64_t Engine::network_evaluations() const {
  int64_t rows = 0;
  for (const auto& w : workers_) {
    const WorkerStats s = w->stats();
    rows += s.rows + s.background_rows;
  }
  return rows;
}

double Engine::completion_seconds() const {
  return completions_->busy_seconds();
}

std::vector<WorkerStats> Engine::worker_stats() const {
  std::vector<WorkerStats> stats;
  for (const auto& w : workers_) stats.push_back(w->stats());
  return stats;
}

}  // namespace vdm
