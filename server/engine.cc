#include "server/engine.h"

#include <ATen/ATen.h>
#include <torch/script.h>

#include <algorithm>
#include <deque>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "model/vdm/denoiser.h"
#include "server/metrics.h"
#include "server/tasks.h"

namespace vdm {

// One device: a model replica and the thread that batches for it.
// Admit/load/Stop are thread-safe; everything else runs on the worker thread.
class Worker {
 public:
  Worker(int index, std::unique_ptr<Denoiser> model,
         const Engine::Options& options, Metrics* metrics)
      : index_(index), model_(std::move(model)), options_(options),
        metrics_(metrics) {
    thread_ = std::thread([this] { Run(); });
  }
  ~Worker() { Stop(); }

  const Denoiser& model() const { return *model_; }

  absl::Status Admit(std::unique_ptr<Task> task, int64_t rows) {
    absl::MutexLock lock(&mu_);
    if (stopping_) return absl::UnavailableError("server is shutting down");
    if (queued_rows_ + rows > options_.max_queued_rows) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "queue full: ", queued_rows_, " rows admitted, limit ",
          options_.max_queued_rows, "; retry later"));
    }
    queued_rows_ += rows;
    incoming_.push_back({std::move(task), rows});
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
  int64_t evaluations() const { return evaluations_.load(); }

  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      stopping_ = true;
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Entry {
    std::unique_ptr<Task> task;
    int64_t rows;  // admitted cost, released when the task leaves
  };

  void Run();
  bool TakeIncoming();
  void Sweep();
  void RunBatch();
  void Retire(size_t index, absl::Status status);
  void UpdateGauges();

  const int index_;
  std::unique_ptr<Denoiser> model_;
  const Engine::Options options_;
  Metrics* const metrics_;
  std::atomic<int64_t> evaluations_{0};

  mutable absl::Mutex mu_;
  std::deque<Entry> incoming_ ABSL_GUARDED_BY(mu_);
  int64_t queued_rows_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;

  // Worker thread only.
  std::vector<Entry> live_;
  size_t rotation_ = 0;  // where the next batch starts gathering rows
  std::thread thread_;
};

void Worker::Run() {
  while (TakeIncoming()) {
    Sweep();
    if (!live_.empty()) RunBatch();
    UpdateGauges();
  }
  // Stopping: fail whatever has not finished.
  while (!live_.empty()) {
    Retire(live_.size() - 1, absl::UnavailableError("server is shutting down"));
  }
  std::deque<Entry> rest;
  {
    absl::MutexLock lock(&mu_);
    rest.swap(incoming_);
  }
  for (Entry& e : rest) {
    e.task->Finish(absl::UnavailableError("server is shutting down"));
  }
}

// Moves newly admitted tasks into the live set (waiting when idle) and starts
// them. Returns false when the worker must stop.
bool Worker::TakeIncoming() {
  std::deque<Entry> fresh;
  {
    absl::MutexLock lock(&mu_);
    auto ready = [this]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      return stopping_ || !incoming_.empty();
    };
    if (live_.empty()) mu_.Await(absl::Condition(&ready));
    if (stopping_) return false;
    fresh.swap(incoming_);
  }
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
  return true;
}

// Removes cancelled and expired requests before they cost another row.
void Worker::Sweep() {
  const absl::Time now = absl::Now();
  for (size_t i = live_.size(); i-- > 0;) {
    const RequestControl& c = live_[i].task->control();
    if (c.is_cancelled && c.is_cancelled()) {
      if (metrics_) metrics_->AddCancelled("cancelled");
      Retire(i, absl::CancelledError("request cancelled by the client"));
    } else if (now > c.deadline) {
      if (metrics_) metrics_->AddCancelled("deadline");
      Retire(i, absl::DeadlineExceededError(
                    "deadline expired before the request finished"));
    }
  }
}

void Worker::RunBatch() {
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
  std::vector<std::pair<size_t, int64_t>> parts;  // task index, rows
  std::vector<at::Tensor> z, gamma, label;
  int64_t room = options_.max_batch;
  for (size_t i : order) {
    if (room == 0) break;
    Rows rows = live_[i].task->Take(room);
    if (!rows.z.defined() || rows.z.size(0) == 0) continue;
    room -= rows.z.size(0);
    parts.emplace_back(i, rows.z.size(0));
    z.push_back(rows.z);
    gamma.push_back(rows.gamma);
    label.push_back(rows.label);
  }
  if (parts.empty()) return;
  const int64_t total = options_.max_batch - room;
  const absl::Time start = absl::Now();
  absl::StatusOr<at::Tensor> eps;
  {
    torch::NoGradGuard no_grad;
    eps = model_->Denoise(at::cat(z), at::cat(gamma), at::cat(label));
  }
  const absl::Time end = absl::Now();
  evaluations_ += total;
  if (metrics_) {
    metrics_->RecordBatch(static_cast<int>(total), options_.max_batch,
                          absl::ToDoubleSeconds(end - start));
  }
  int64_t offset = 0;
  std::vector<std::pair<size_t, absl::Status>> finished;
  for (const auto& [i, m] : parts) {
    Task& task = *live_[i].task;
    if (task.first_forward() == absl::InfinitePast() && metrics_) {
      metrics_->RecordQueueTime(task.method(),
                                absl::ToDoubleSeconds(start - task.arrival()));
    }
    task.MarkForward(start);
    task.AddEvaluations(m);
    absl::Status given =
        eps.ok() ? task.Give(eps->narrow(0, offset, m).to(at::kCPU))
                 : eps.status();
    offset += m;
    if (!given.ok() || task.done()) finished.emplace_back(i, given);
  }
  // Retire from the back so the remaining indices stay valid.
  std::sort(finished.begin(), finished.end(),
            [](const auto& a, const auto& b) { return a.first > b.first; });
  for (auto& [i, status] : finished) Retire(i, std::move(status));
}

// Finishes live_[index] with `status` (OK = deliver the result) and releases
// its admitted rows.
void Worker::Retire(size_t index, absl::Status status) {
  Entry entry = std::move(live_[index]);
  live_.erase(live_.begin() + static_cast<std::ptrdiff_t>(index));
  try {
    entry.task->Finish(std::move(status));
  } catch (const std::exception& err) {
    entry.task->Finish(absl::InternalError(err.what()));
  }
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

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(
    const Options& options, std::vector<std::unique_ptr<Denoiser>> replicas,
    Metrics* metrics) {
  if (replicas.empty()) {
    return absl::InvalidArgumentError("engine needs at least one model replica");
  }
  if (options.max_batch < 1) {
    return absl::InvalidArgumentError("max_batch must be >= 1");
  }
  std::unique_ptr<Engine> engine(new Engine(options));
  for (auto& model : replicas) {
    const int index = static_cast<int>(engine->workers_.size());
    engine->workers_.push_back(
        std::make_unique<Worker>(index, std::move(model), options, metrics));
  }
  return engine;
}

Engine::Engine(const Options& options) : options_(options) {}

Engine::~Engine() { Stop(); }

void Engine::Stop() {
  for (auto& w : workers_) w->Stop();
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

absl::Status Engine::SubmitSample(const SampleJob& job, RequestControl control,
                                  SampleCallback done) {
  Worker* worker = LeastLoaded();
  const int64_t rows = SampleJobRows(job, worker->model().num_classes());
  return worker->Admit(
      MakeSampleTask(job, std::move(control), std::move(done), absl::Now()),
      rows);
}

absl::Status Engine::SubmitScore(ScoreJob job, RequestControl control,
                                 ScoreCallback done) {
  Worker* worker = LeastLoaded();
  const int64_t rows =
      static_cast<int64_t>(job.images.size()) * job.timesteps;
  return worker->Admit(MakeScoreTask(std::move(job), std::move(control),
                                     std::move(done), absl::Now()),
                       rows);
}

bool Engine::WaitIdle(absl::Time deadline) {
  bool idle = true;
  for (auto& w : workers_) idle = w->WaitIdle(deadline) && idle;
  return idle;
}

int64_t Engine::network_evaluations() const {
  int64_t total = 0;
  for (const auto& w : workers_) total += w->evaluations();
  return total;
}

}  // namespace vdm
