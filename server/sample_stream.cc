// SampleStream: Sample with progress messages and previews, on a server-side
// write reactor.
#include <deque>

#include "absl/synchronization/mutex.h"
#include "proto/convert.h"
#include "server/request_log.h"
#include "server/rpc_util.h"
#include "server/service.h"
#include "server/tasks.h"
#include "server/validation.h"

namespace vdm {
namespace {

// Writes the stream's messages one at a time, in order. Progress messages
// that pile up behind a slow reader are coalesced (only the newest waiting
// one is kept); the result is always written. Thread-safe: the engine's
// completion thread pushes, gRPC calls OnWriteDone/OnDone. Finish is called
// after the mutex is released and is the last use of `this`: gRPC may run
// OnDone (which deletes the reactor) on another thread at once.
class SampleStreamReactor
    : public grpc::ServerWriteReactor<v1::SampleStreamResponse> {
 public:
  SampleStreamReactor(grpc::CallbackServerContext* context, Metrics* metrics)
      : log_(context, "SampleStream", metrics) {}
  RequestLog& log() { return log_; }

  void PushProgress(const SampleProgress& p, v1::ImageFormat format) {
    v1::SampleStreamResponse message;
    auto* progress = message.mutable_progress();
    progress->set_step(p.step);
    progress->set_total_steps(p.total_steps);
    for (const Image8& image : p.previews) {
      if (!ImageToProto(image, format, progress->add_previews()).ok()) break;
    }
    absl::ReleasableMutexLock lock(&mu_);
    // Never the front while it is being written: gRPC reads it until
    // OnWriteDone, and overwriting it lost the message that replaced it.
    const bool back_in_flight = writing_ && pending_.size() == 1;
    if (!pending_.empty() && !back_in_flight && pending_.back().has_progress() &&
        pending_.back().progress().previews_size() == 0) {
      pending_.back() = std::move(message);  // coalesce plain progress
    } else {
      pending_.push_back(std::move(message));
    }
    Next(lock);
  }

  void PushResult(v1::SampleResponse result) {
    absl::ReleasableMutexLock lock(&mu_);
    v1::SampleStreamResponse message;
    *message.mutable_result() = std::move(result);
    pending_.push_back(std::move(message));
    Next(lock);
  }

  // Finishes after the pending messages are written.
  void FinishWith(const absl::Status& status) {
    absl::ReleasableMutexLock lock(&mu_);
    final_status_ = status;
    finishing_ = true;
    Next(lock);
  }

  void OnWriteDone(bool ok) override {
    absl::ReleasableMutexLock lock(&mu_);
    writing_ = false;
    pending_.pop_front();
    if (!ok) {  // the client is gone: drop the rest, the engine sees the cancel
      pending_.clear();
      broken_ = true;
    }
    Next(lock);
  }

  void OnDone() override { delete this; }

 private:
  // Starts the next write, or finishes when everything is written; releases
  // `lock` in every case. After Finish nothing touches `this`.
  void Next(absl::ReleasableMutexLock& lock) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (writing_ || finished_) return lock.Release();
    if (!pending_.empty() && !broken_) {
      writing_ = true;
      StartWrite(&pending_.front());
      return lock.Release();
    }
    if (!finishing_) return lock.Release();
    finished_ = true;
    log_.Done(final_status_);
    const grpc::Status status = ToGrpcStatus(final_status_);
    lock.Release();
    Finish(status);
  }

  RequestLog log_;  // written under mu_ or before the engine runs the job
  absl::Mutex mu_;
  std::deque<v1::SampleStreamResponse> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status final_status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace

grpc::ServerWriteReactor<v1::SampleStreamResponse>*
VdmServiceImpl::SampleStream(grpc::CallbackServerContext* context,
                             const v1::SampleRequest* request) {
  auto* reactor = new SampleStreamReactor(context, metrics_);
  absl::StatusOr<std::shared_ptr<const ServedModel>> served =
      AdmitAndResolve(*context, *request, reactor->log());
  if (!served.ok()) {
    reactor->FinishWith(served.status());
    return reactor;
  }
  const std::shared_ptr<const ServedModel> model = *std::move(served);
  absl::StatusOr<SampleJob> job =
      ToSampleJob(*request, options_, model->description);
  if (job.ok() && request->preview_every() < 0) {
    job = absl::InvalidArgumentError("preview_every: must be >= 0");
  }
  if (!job.ok()) {
    reactor->FinishWith(job.status());
    return reactor;
  }
  const v1::ImageFormat format = request->format();
  const uint64_t seed = job->seed;
  reactor->log().SetImages(job->num_images);
  job->preview_every = request->preview_every();
  job->progress = [reactor, format](SampleProgress p) {
    reactor->PushProgress(p, format);
  };
  Metrics* metrics = metrics_;
  auto done = [reactor, format, seed, metrics,
               model](absl::StatusOr<SampleResult> r) {
        if (!r.ok()) return reactor->FinishWith(r.status());
        reactor->log().SetResult(r->network_evaluations, r->queue_seconds,
                                 r->compute_seconds);
        v1::SampleResponse response;
        response.set_model(model->name);
        response.set_model_version(model->version);
        absl::Status s = FillSampleResponse(*r, format, seed, &response);
        if (s.ok()) {
          reactor->PushResult(std::move(response));
          if (metrics) metrics->AddImagesGenerated(r->images.size());
        }
        reactor->FinishWith(s);
      };
  const int num_classes = model->description.num_classes;
  absl::Status admitted = engine_->Submit(
      MakeSampleTask(*std::move(job), num_classes, std::move(done)),
      ControlOf(context), model->engine_model);
  if (!admitted.ok()) reactor->FinishWith(admitted);
  return reactor;
}

}  // namespace vdm
