#include "server/engine.h"

#include <ATen/ATen.h>
#include <malloc.h>
#include <torch/script.h>

#include <algorithm>
#include <deque>
#include <functional>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/request.h"
#include "model/vdm/status_macros.h"
#include "server/metrics.h"
#include "server/tasks.h"

namespace vdm {

// Runs closures in order, on one thread of its own (threaded mode) or at
// once on the caller's thread (manual mode). One thread keeps every
// request's progress messages before its result.
class CompletionQueue {
 public:
  CompletionQueue(bool threaded, Metrics* metrics) : metrics_(metrics) {
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
      if (metrics_) metrics_->AddCompletionSeconds(seconds);
      mu_.Lock();
      busy_seconds_ += seconds;
      --running_;
    }
  }

  Metrics* const metrics_;
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

// Rows evaluated by all workers, with a condition to wait on.
struct EvaluationCounter {
  absl::Mutex mu;
  int64_t rows ABSL_GUARDED_BY(mu) = 0;
  int64_t admitted ABSL_GUARDED_BY(mu) = 0;  // jobs ever admitted
};

// One device: a model replica and the loop that batches for it. Admit,
// load, WaitIdle, Stop and stats are thread-safe; everything else runs on
// the worker's thread (or the manual caller's).
class Worker {
 public:
  Worker(int index, std::unique_ptr<Denoiser> model,
         std::unique_ptr<Denoiser> background, const Engine::Options& options,
         Metrics* metrics, CompletionQueue* completions,
         EvaluationCounter* counter)
      : index_(index), model_(std::move(model)),
        background_(std::move(background)), options_(options),
        metrics_(metrics), completions_(completions), counter_(counter) {
    if (metrics_) seconds_ = metrics_->WorkerSecondsOf(index_);
    if (options_.threaded) thread_ = std::thread([this] { Run(); });
  }
  ~Worker() { Stop(); }

  const Denoiser& model() const { return *model_; }

  // `width`: the rows of the job's first forward pass (the request-level
  // admission policy fills batches by it).
  absl::Status Admit(std::unique_ptr<Task> task, int64_t rows, int64_t width) {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("server is shutting down");
    if (rows > options_.max_queued_rows) {
      // Not retryable: it would not fit into an empty queue either.
      return absl::InvalidArgumentError(absl::StrCat(
          "request too large: ", rows, " network rows, more than the queue "
          "holds (", options_.max_queued_rows, ")"));
    }
    if (queued_rows_ + rows > options_.max_queued_rows) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "queue full: ", queued_rows_, " rows admitted, limit ",
          options_.max_queued_rows, "; retry later"));
    }
    queued_rows_ += rows;
    incoming_.push_back({std::move(task), rows, width});
    absl::MutexLock count(&counter_->mu);
    ++counter_->admitted;
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

  // One iteration (see Engine::Step).
  bool Step();

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
    int64_t rows;  // admitted cost, released when the task leaves
    int64_t width;  // rows of its first forward pass
  };

  void Run();
  void FailAll();
  // Moves newly admitted tasks into the live set and starts them. With
  // `wait` (threaded): first waits for work when nothing is live; returns
  // false when the worker must stop. Without: returns whether any arrived.
  bool TakeIncoming(bool wait);
  // kRequestLevel and kOneAtATime with nothing live: moves the next batch of
  // jobs from incoming_ into `fresh` (see Engine::Admission).
  void TakeBatch(bool wait, std::deque<Entry>* fresh)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // One iteration after TakeIncoming (see Engine::Step).
  bool Iterate(absl::Time start, bool took);
  bool Sweep();
  // Gathers, evaluates and hands out one batch; adds its forward time.
  bool RunBatch(double* forward_seconds);
  // eps_hat of the gathered rows, in order; with Options::score_fp32 and a
  // reduced-precision replica, score rows in an fp32 pass of their own
  // (`parts` and `rows` are reordered, scores first, to match).
  absl::StatusOr<at::Tensor> EvaluateBatch(
      std::vector<std::pair<size_t, int64_t>>& parts, std::vector<Rows>& rows);
  // Evaluates the rows of the batch's parts whose task wants them on the
  // background model and gives them to the tasks. Returns one status per
  // live task (OK for the others); adds the forward time.
  std::vector<absl::Status> RunBackground(
      const std::vector<std::pair<size_t, int64_t>>& parts,
      const std::vector<Rows>& rows, double* forward_seconds);
  void Retire(size_t index, absl::Status status);
  void UpdateGauges();
  absl::Time Now() const { return options_.clock->Now(); }

  const int index_;
  std::unique_ptr<Denoiser> model_;
  std::unique_ptr<Denoiser> background_;  // may be null
  const Engine::Options options_;
  Metrics* const metrics_;
  CompletionQueue* const completions_;
  EvaluationCounter* const counter_;
  Metrics::WorkerSeconds seconds_{};  // when metrics_

  mutable absl::Mutex mu_;
  std::deque<Entry> incoming_ ABSL_GUARDED_BY(mu_);
  int64_t queued_rows_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  WorkerStats stats_ ABSL_GUARDED_BY(mu_);

  // Worker thread only.
  std::vector<Entry> live_;
  size_t rotation_ = 0;  // where the next batch starts gathering rows
  bool vjp_turn_ = false;  // alternates plain and VJP batches
  std::thread thread_;
};

void Worker::Run() {
  while (TakeIncoming(/*wait=*/true)) Iterate(Now(), /*took=*/false);
  FailAll();
}

bool Worker::Step() {
  const absl::Time start = Now();
  return Iterate(start, TakeIncoming(/*wait=*/false));
}

bool Worker::Iterate(absl::Time start, bool took) {
  bool worked = Sweep();
  double forward = 0;
  worked = RunBatch(&forward) || worked;
  UpdateGauges();
  // Host time: the whole iteration (from after the wait for work) but the
  // forward pass.
  const double host = absl::ToDoubleSeconds(Now() - start) - forward;
  if (metrics_) {
    seconds_.forward->Increment(forward);
    seconds_.host->Increment(host);
  }
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
  {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return stopping_ || !incoming_.empty();
    };
    if (wait && live_.empty()) mu_.Await(absl::Condition(&ready));
    if (wait && stopping_) return false;
    if (options_.admission == Engine::Admission::kContinuous) {
      fresh.swap(incoming_);
    } else if (live_.empty()) {
      TakeBatch(wait, &fresh);
    }
  }
  const bool took = !fresh.empty();
  for (Entry& e : fresh) {
    absl::Status started;
    try {
      started = e.task->Start(*model_);
    } catch (const std::exception& err) {
      started = absl::InternalError(
          absl::StrCat("cannot start request: ", err.what()));
    }
    live_.push_back(std::move(e));
    if (!started.ok()) Retire(live_.size() - 1, started);
  }
  return wait || took;
}

void Worker::TakeBatch(bool wait, std::deque<Entry>* fresh) {
  if (incoming_.empty()) return;
  if (options_.admission == Engine::Admission::kRequestLevel) {
    // The batch closes batch_window after its first job arrived, or as soon
    // as the queued jobs' first passes fill max_batch rows.
    auto full = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      int64_t width = 0;
      for (const Entry& e : incoming_) width += e.width;
      return stopping_ || width >= options_.max_batch;
    };
    const absl::Duration open =
        incoming_.front().task->arrival() + options_.batch_window - Now();
    if (open > absl::ZeroDuration() && !full()) {
      // Threaded: wait out the window (real time). Manual: the caller
      // advances the clock and steps again.
      if (!wait) return;
      mu_.AwaitWithTimeout(absl::Condition(&full), open);
      if (stopping_) return;
    }
  }
  int64_t width = 0;
  while (!incoming_.empty()) {
    Entry& next = incoming_.front();
    if (!fresh->empty() &&
        (options_.admission == Engine::Admission::kOneAtATime ||
         width + next.width > options_.max_batch)) {
      break;
    }
    width += next.width;
    fresh->push_back(std::move(next));
    incoming_.pop_front();
  }
}

// Removes cancelled and expired requests before they cost another row.
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
      if (metrics_) metrics_->AddCancelled("deadline");
      Retire(i, absl::DeadlineExceededError(
                    "deadline expired before the request finished"));
      removed = true;
    } else if (cancelled) {
      if (metrics_) metrics_->AddCancelled("cancelled");
      Retire(i, absl::CancelledError("request cancelled by the client"));
      removed = true;
    }
  }
  return removed;
}

bool Worker::RunBatch(double* forward_seconds) {
  if (live_.empty()) return false;
  // Gather order: rotate the starting point so every request gets rows even
  // when one alone could fill the batch; scores first when prioritized.
  std::vector<size_t> order(live_.size());
  for (size_t i = 0; i < order.size(); ++i) {
    order[i] = (rotation_ + i) % live_.size();
  }
  ++rotation_;
  if (options_.score_priority) {
    std::stable_partition(order.begin(), order.end(), [this](size_t i) {
      return live_[i].task->is_score();
    });
  }
  // Rows that need a vector-Jacobian product (ODE scores) run in a pass of
  // their own, forward + backward with gradients, where a row costs about
  // kVjpRowCost plain rows: when both kinds are live, iterations alternate.
  bool any_vjp = false, any_plain = false;
  for (const Entry& e : live_) (e.task->needs_vjp() ? any_vjp : any_plain) = true;
  if (any_vjp && any_plain) vjp_turn_ = !vjp_turn_;
  bool vjp = any_vjp && (!any_plain || vjp_turn_);
  std::vector<std::pair<size_t, int64_t>> parts;  // task index, rows
  std::vector<Rows> rows;
  int64_t capacity = 0, room = 0;
  auto gather = [&](bool kind) {
    capacity = kind ? std::max<int64_t>(1, options_.max_batch / kVjpRowCost)
                    : options_.max_batch;
    room = capacity;
    for (size_t i : order) {
      if (room == 0) break;
      if (live_[i].task->needs_vjp() != kind) continue;
      Rows r = live_[i].task->Take(room);
      if (r.empty()) continue;
      room -= r.size();
      parts.emplace_back(i, r.size());
      rows.push_back(std::move(r));
    }
  };
  gather(vjp);
  if (parts.empty() && any_vjp && any_plain) gather(vjp = !vjp);  // none ready
  if (parts.empty()) return false;
  const int64_t total = capacity - room;
  const absl::Time start = Now();
  absl::StatusOr<at::Tensor> eps;
  at::Tensor vjps;  // v^T d eps / d z of a VJP batch
  if (vjp) {
    try {
      absl::StatusOr<EpsVjp> out = EvaluateVjp(*model_, Rows::Cat(rows));
      if (out.ok()) {
        eps = out->eps.to(at::kCPU);
        vjps = out->vjp.to(at::kCPU);
      } else {
        eps = out.status();
      }
    } catch (const std::exception& e) {
      eps = absl::InternalError(absl::StrCat("forward+backward pass: ", e.what()));
    }
  } else {
    torch::NoGradGuard no_grad;
    try {
      eps = EvaluateBatch(parts, rows);
      if (eps.ok()) *eps = eps->to(at::kCPU);  // once per batch
    } catch (const std::exception& e) {
      eps = absl::InternalError(absl::StrCat("forward pass: ", e.what()));
    }
  }
  const absl::Time end = Now();
  const double forward = absl::ToDoubleSeconds(end - start);
  *forward_seconds += forward;
  {
    absl::MutexLock lock(&mu_);
    stats_.batches += 1;
    stats_.rows += total;
    stats_.forward_seconds += forward;
  }
  {
    absl::MutexLock lock(&counter_->mu);
    counter_->rows += total;
  }
  if (metrics_) {
    metrics_->RecordBatch(static_cast<int>(total), options_.max_batch, forward);
  }
  const std::vector<absl::Status> background =
      RunBackground(parts, rows, forward_seconds);
  int64_t offset = 0;
  std::vector<std::pair<size_t, absl::Status>> finished;
  for (const auto& [i, m] : parts) {
    Task& task = *live_[i].task;
    if (!task.started_forward() && metrics_) {
      metrics_->RecordQueueTime(task.method(),
                                absl::ToDoubleSeconds(start - task.arrival()));
    }
    task.MarkForward(start);
    task.AddEvaluations(m);
    absl::Status given;
    if (eps.ok()) {
      try {
        given = vjp ? task.GiveVjp(eps->narrow(0, offset, m),
                                   vjps.narrow(0, offset, m))
                    : task.Give(eps->narrow(0, offset, m));
      } catch (const std::exception& e) {
        given = absl::InternalError(absl::StrCat("request step: ", e.what()));
      }
    } else {
      given = eps.status();
    }
    if (given.ok()) given = background[i];
    offset += m;
    if (!given.ok() || task.done()) finished.emplace_back(i, given);
  }
  // Retire from the back so the remaining indices stay valid.
  std::sort(finished.begin(), finished.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  for (auto& [i, status] : finished) Retire(i, std::move(status));
  return true;
}

std::vector<absl::Status> Worker::RunBackground(
    const std::vector<std::pair<size_t, int64_t>>& parts,
    const std::vector<Rows>& rows, double* forward_seconds) {
  std::vector<absl::Status> status(live_.size());
  if (!background_) return status;
  std::vector<Rows> wanted;
  std::vector<std::pair<size_t, int64_t>> which;
  for (size_t k = 0; k < parts.size(); ++k) {
    if (!live_[parts[k].first].task->wants_background()) continue;
    wanted.push_back(rows[k]);
    which.push_back(parts[k]);
  }
  if (wanted.empty()) return status;
  const absl::Time start = Now();
  absl::StatusOr<at::Tensor> eps;
  {
    torch::NoGradGuard no_grad;
    try {
      eps = Evaluate(*background_, Rows::Cat(wanted), options_.score_fp32);
      if (eps.ok()) *eps = eps->to(at::kCPU);
    } catch (const std::exception& e) {
      eps = absl::InternalError(
          absl::StrCat("background model forward pass: ", e.what()));
    }
  }
  const double forward = absl::ToDoubleSeconds(Now() - start);
  *forward_seconds += forward;
  int64_t offset = 0;
  for (const auto& [i, m] : which) {
    Task& task = *live_[i].task;
    task.AddEvaluations(m);
    if (!eps.ok()) {
      status[i] = eps.status();
    } else {
      try {
        status[i] = task.GiveBackground(eps->narrow(0, offset, m));
      } catch (const std::exception& e) {
        status[i] = absl::InternalError(
            absl::StrCat("request step (background): ", e.what()));
      }
    }
    offset += m;
  }
  {
    absl::MutexLock lock(&mu_);
    stats_.background_rows += offset;
    stats_.forward_seconds += forward;
  }
  absl::MutexLock lock(&counter_->mu);
  counter_->rows += offset;
  return status;
}

absl::StatusOr<at::Tensor> Worker::EvaluateBatch(
    std::vector<std::pair<size_t, int64_t>>& parts, std::vector<Rows>& rows) {
  if (!options_.score_fp32 || model_->precision() == Precision::kFp32) {
    return Evaluate(*model_, Rows::Cat(rows));
  }
  std::vector<size_t> order(parts.size());
  for (size_t j = 0; j < order.size(); ++j) order[j] = j;
  const auto is_score = [&](size_t j) {
    return live_[parts[j].first].task->is_score();
  };
  const size_t scores = static_cast<size_t>(
      std::stable_partition(order.begin(), order.end(), is_score) -
      order.begin());
  if (scores == 0) return Evaluate(*model_, Rows::Cat(rows));
  if (scores == order.size()) return Evaluate(*model_, Rows::Cat(rows), true);
  std::vector<std::pair<size_t, int64_t>> sorted_parts;
  std::vector<Rows> sorted_rows;
  for (size_t k = 0; k < order.size(); ++k) {
    sorted_parts.push_back(parts[order[k]]);
    sorted_rows.push_back(std::move(rows[order[k]]));
  }
  parts = std::move(sorted_parts);
  rows = std::move(sorted_rows);  // the background model reads them after
  const std::vector<Rows> score_rows(rows.begin(), rows.begin() + scores);
  const std::vector<Rows> sample_rows(rows.begin() + scores, rows.end());
  absl::StatusOr<at::Tensor> score_eps =
      Evaluate(*model_, Rows::Cat(score_rows), /*fp32=*/true);
  if (!score_eps.ok()) return score_eps;
  absl::StatusOr<at::Tensor> sample_eps =
      Evaluate(*model_, Rows::Cat(sample_rows));
  if (!sample_eps.ok()) return sample_eps;
  return at::cat({score_eps->to(at::kCPU), sample_eps->to(at::kCPU)});
}

// Takes live_[index] out, releases its admitted rows and hands it to the
// completion queue, which delivers the result (status OK) or the error.
void Worker::Retire(size_t index, absl::Status status) {
  Entry entry = std::move(live_[index]);
  live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(index));
  const absl::Time now = Now();
  std::shared_ptr<Task> task(std::move(entry.task));
  completions_->Post([task, status = std::move(status), now]() mutable {
    try {
      task->Finish(std::move(status), now);
    } catch (const std::exception& err) {
      task->Finish(absl::InternalError(err.what()), now);
    }
  });
  absl::MutexLock lock(&mu_);
  queued_rows_ -= entry.rows;
}

void Worker::UpdateGauges() {
  if (!metrics_) return;
  absl::MutexLock lock(&mu_);
  metrics_->SetWorkerLoad(index_, static_cast<double>(incoming_.size()),
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

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const Options& options, std::vector<std::unique_ptr<Denoiser>> replicas,
    Metrics* metrics, std::vector<std::unique_ptr<Denoiser>> background) {
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
  if (options.max_batch < 1) {
    return absl::InvalidArgumentError("max_batch must be >= 1");
  }
  if (options.batch_window < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("batch_window must be >= 0");
  }
  std::unique_ptr<Engine> engine(new Engine(options, metrics));
  engine->has_background_ = !background.empty();
  for (size_t i = 0; i < replicas.size(); ++i) {
    const int index = static_cast<int>(engine->workers_.size());
    engine->workers_.push_back(std::make_unique<Worker>(
        index, std::move(replicas[i]),
        background.empty() ? nullptr : std::move(background[i]),
        engine->options_, metrics, engine->completions_.get(),
        engine->counter_.get()));
  }
  return engine;
}

Engine::Engine(const Options& options, Metrics* metrics)
    : options_(options),
      completions_(
          std::make_unique<CompletionQueue>(options.threaded, metrics)),
      counter_(std::make_unique<EvaluationCounter>()) {
  if (options_.clock == nullptr) options_.clock = Clock::Real();
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

absl::Status Engine::SubmitSample(SampleJob job, RequestControl control,
                                  SampleCallback done) {
  Worker* worker = LeastLoaded();
  const int64_t rows =
      SampleRowCost(job.sampler, job.num_images, job.conditioning,
                    worker->model().num_classes());
  const int64_t width =
      job.num_images * RowsPerImage(job.conditioning,
                                    worker->model().num_classes());
  if (job.progress) {
    // Progress goes through the completion queue too: off the worker, and
    // in order with the result.
    job.progress = [queue = completions_.get(),
                    report = std::move(job.progress)](SampleProgress p) {
      queue->Post([report, p = std::move(p)]() mutable {
        report(std::move(p));
      });
    };
  }
  return worker->Admit(MakeSampleTask(std::move(job), std::move(control),
                                      std::move(done), options_.clock->Now()),
                       rows, width);
}

absl::Status Engine::SubmitScore(ScoreJob job, RequestControl control,
                                 ScoreCallback done) {
  Worker* worker = LeastLoaded();
  job.background = has_background_;
  const int64_t rows =
      ScoreJobRowCost(job, static_cast<int64_t>(job.images.size()));
  // The rows of the first pass: all K evaluations of every image (ELBO), or
  // one row per image and trace sample (ODE).
  const int64_t width =
      job.method == ScoreMethod::kOde
          ? static_cast<int64_t>(job.images.size()) * job.trace_samples
          : rows;
  return worker->Admit(MakeScoreTask(std::move(job), std::move(control),
                                     std::move(done), options_.clock->Now()),
                       rows, width);
}

absl::Status Engine::SubmitEncode(EncodeJob job, RequestControl control,
                                  EncodeCallback done) {
  Worker* worker = LeastLoaded();
  const int64_t rows = EncodeRowCost(static_cast<int64_t>(job.images.size()),
                                     job.sampler.steps);
  const int64_t width = static_cast<int64_t>(job.images.size());  // per step
  return worker->Admit(MakeEncodeTask(std::move(job), std::move(control),
                                      std::move(done), options_.clock->Now()),
                       rows, width);
}

bool Engine::WaitIdle(absl::Time deadline) {
  bool idle = true;
  for (auto& w : workers_) idle = w->WaitIdle(deadline) && idle;
  return completions_->WaitEmpty(deadline) && idle;
}

bool Engine::AwaitEvaluations(int64_t rows, absl::Time deadline) {
  absl::MutexLock lock(&counter_->mu);
  auto reached = [this, rows]() ABSL_SHARED_LOCKS_REQUIRED(counter_->mu) {
    return counter_->rows >= rows;
  };
  return counter_->mu.AwaitWithDeadline(absl::Condition(&reached), deadline);
}

bool Engine::AwaitAdmitted(int64_t jobs, absl::Time deadline) {
  absl::MutexLock lock(&counter_->mu);
  auto reached = [this, jobs]() ABSL_SHARED_LOCKS_REQUIRED(counter_->mu) {
    return counter_->admitted >= jobs;
  };
  return counter_->mu.AwaitWithDeadline(absl::Condition(&reached), deadline);
}

int64_t Engine::network_evaluations() const {
  absl::MutexLock lock(&counter_->mu);
  return counter_->rows;
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
