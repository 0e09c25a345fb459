#include "server/service.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/vdm/image_io.h"
#include "model/vdm/request.h"
#include "model/vdm/status_macros.h"
#include "proto/convert.h"
#include "server/rpc_util.h"
#include "server/validation.h"

namespace vdm {
namespace {

// Finishes an RPC and records it in the metrics.
class Finisher {
 public:
  Finisher(grpc::ServerUnaryReactor* reactor, Metrics* metrics,
           const char* method)
      : reactor_(reactor), metrics_(metrics), method_(method),
        start_(absl::Now()) {}
  void operator()(const absl::Status& status) const {
    if (metrics_) {
      metrics_->RecordRequest(method_, absl::StatusCodeToString(status.code()),
                              absl::ToDoubleSeconds(absl::Now() - start_));
    }
    reactor_->Finish(ToGrpcStatus(status));
  }

 private:
  grpc::ServerUnaryReactor* reactor_;
  Metrics* metrics_;
  const char* method_;
  absl::Time start_;
};

}  // namespace

bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

absl::Status VdmServiceImpl::Admit(
    const grpc::CallbackServerContext& context) const {
  if (draining_) {
    return absl::UnavailableError("server is shutting down; retry elsewhere");
  }
  if (options_.auth_token.empty()) return absl::OkStatus();
  const auto& metadata = context.client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "missing metadata 'authorization: Bearer <token>'");
  }
  if (metadata.count("authorization") > 1) {
    return absl::UnauthenticatedError(
        "more than one 'authorization' metadata entry; send exactly one");
  }
  const absl::string_view given(it->second.data(), it->second.size());
  if (!ConstantTimeEquals(given, "Bearer " + options_.auth_token)) {
    return absl::UnauthenticatedError("wrong bearer token");
  }
  return absl::OkStatus();
}

grpc::ServerUnaryReactor* VdmServiceImpl::Sample(
    grpc::CallbackServerContext* context, const v1::SampleRequest* request,
    v1::SampleResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const Finisher finish(reactor, metrics_, "Sample");
  if (absl::Status s = Admit(*context); !s.ok()) {
    finish(s);
    return reactor;
  }
  absl::StatusOr<SampleJob> job = ToSampleJob(*request, options_, model_);
  if (!job.ok()) {
    finish(job.status());
    return reactor;
  }
  const v1::ImageFormat format = request->format();
  const uint64_t seed = job->seed;
  Metrics* metrics = metrics_;
  absl::Status admitted = engine_->SubmitSample(
      *std::move(job), ControlOf(context),
      [finish, format, seed, response, metrics](absl::StatusOr<SampleResult> r) {
        if (!r.ok()) return finish(r.status());
        absl::Status s = FillSampleResponse(*r, format, seed, response);
        if (s.ok() && metrics) metrics->AddImagesGenerated(r->images.size());
        finish(s);
      });
  if (!admitted.ok()) finish(admitted);
  return reactor;
}

grpc::ServerUnaryReactor* VdmServiceImpl::ScoreBPD(
    grpc::CallbackServerContext* context, const v1::ScoreRequest* request,
    v1::ScoreResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  const Finisher finish(reactor, metrics_, "ScoreBPD");
  if (absl::Status s = Admit(*context); !s.ok()) {
    finish(s);
    return reactor;
  }
  absl::StatusOr<ScoreJob> job = ToScoreJob(*request, options_, model_);
  if (!job.ok()) {
    finish(job.status());
    return reactor;
  }
  const uint64_t seed = job->seed;
  const double reference = model_.reference_bpd;
  Metrics* metrics = metrics_;
  absl::Status admitted = engine_->SubmitScore(
      *std::move(job), ControlOf(context),
      [finish, seed, reference, response, metrics](absl::StatusOr<ScoreResult> r) {
        if (!r.ok()) return finish(r.status());
        for (const ImageBpd& s : r->scores) {
          v1::ImageScore* out = response->add_scores();
          out->set_bpd(s.bpd);
          out->set_prior_bpd(s.prior);
          out->set_recon_bpd(s.recon);
          out->set_diffusion_bpd(s.diffusion);
          out->set_stderr_bpd(s.stderr_bpd);
          out->set_anomaly_score(s.bpd - reference);
          if (metrics) metrics->RecordBpd(s.bpd);
        }
        response->set_seed(seed);
        response->set_network_evaluations(r->network_evaluations);
        response->set_queue_seconds(r->queue_seconds);
        response->set_compute_seconds(r->compute_seconds);
        if (metrics) metrics->AddImagesScored(r->scores.size());
        finish(absl::OkStatus());
      });
  if (!admitted.ok()) finish(admitted);
  return reactor;
}

grpc::ServerUnaryReactor* VdmServiceImpl::GetModelInfo(
    grpc::CallbackServerContext* context, const v1::ModelInfoRequest*,
    v1::ModelInfo* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (absl::Status s = Admit(*context); !s.ok()) {
    Finisher(reactor, metrics_, "GetModelInfo")(s);
    return reactor;
  }
  response->set_image_channels(model_.shape.channels);
  response->set_image_height(model_.shape.height);
  response->set_image_width(model_.shape.width);
  response->set_num_classes(model_.num_classes);
  response->set_prediction(model_.prediction);
  response->set_metadata(model_.metadata);
  response->set_model_path(model_.path);
  response->set_device(model_.device);
  response->set_gamma_min(model_.gamma_min);
  response->set_gamma_max(model_.gamma_max);
  response->set_max_batch(options_.max_batch);
  response->set_max_images_per_request(options_.max_images_per_request);
  response->set_max_steps(options_.max_steps);
  response->set_max_timesteps(options_.max_timesteps);
  Finisher(reactor, metrics_, "GetModelInfo")(absl::OkStatus());
  return reactor;
}

}  // namespace vdm
