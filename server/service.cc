#include "server/service.h"

#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/vdm/image_io.h"
#include "model/vdm/request.h"
#include "model/vdm/status_macros.h"
#include "proto/convert.h"
#include "server/rpc_util.h"

namespace vdm {
namespace {

constexpr int kDefaultSteps = 50;
constexpr int kDefaultTimesteps = 16;
constexpr float kMaxGuidance = 20.0f;

absl::Status Invalid(const std::string& message) {
  return absl::InvalidArgumentError(message);
}

uint64_t PickSeed(bool has_seed, uint64_t seed) {
  if (has_seed) return seed;
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

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

absl::StatusOr<int> VdmServiceImpl::CheckLabel(bool has_label,
                                               int label) const {
  if (!has_label) return -1;
  if (model_.num_classes == 0) {
    return Invalid("label: the served model is unconditional (num_classes = 0);"
                   " leave label unset");
  }
  if (label < 0 || label >= model_.num_classes) {
    return Invalid(absl::StrFormat("label: %d is out of range [0, %d)", label,
                                   model_.num_classes));
  }
  return label;
}

absl::StatusOr<SampleJob> VdmServiceImpl::ToSampleJob(
    const v1::SampleRequest& r) const {
  SampleJob job;
  if (r.num_images() < 1 || r.num_images() > options_.max_images_per_request) {
    return Invalid(absl::StrFormat("num_images: %d is out of range [1, %d]",
                                   r.num_images(),
                                   options_.max_images_per_request));
  }
  job.num_images = r.num_images();
  VDM_ASSIGN_OR_RETURN(job.sampler.type, SamplerFromProto(r.sampler()));
  VDM_ASSIGN_OR_RETURN(job.sampler.grid, TimeGridFromProto(r.time_grid()));
  job.sampler.steps = r.steps() == 0 ? kDefaultSteps : r.steps();
  if (job.sampler.steps < 1 || job.sampler.steps > options_.max_steps) {
    return Invalid(absl::StrFormat("steps: %d is out of range [1, %d]",
                                   r.steps(), options_.max_steps));
  }
  if (!(r.eta() >= 0.0f && r.eta() <= 1.0f)) {
    return Invalid(absl::StrCat("eta: ", r.eta(), " is out of range [0, 1]"));
  }
  if (r.eta() != 0.0f && job.sampler.type != SamplerType::kDdim) {
    return Invalid(absl::StrCat(
        "eta: ", r.eta(), " applies to the ddim sampler only, not ",
        SamplerName(job.sampler.type),
        " (ddpm is DDIM with eta = 1); leave eta unset"));
  }
  job.sampler.eta = r.eta();
  VDM_ASSIGN_OR_RETURN(job.conditioning.label,
                       CheckLabel(r.has_label(), r.label()));
  if (r.has_guidance_scale()) {
    const float g = r.guidance_scale();
    if (!(g >= 0.0f && g <= kMaxGuidance)) {
      return Invalid(absl::StrCat("guidance_scale: ", g,
                                  " is out of range [0, ", kMaxGuidance, "]"));
    }
    if (job.conditioning.label < 0 && g != 1.0f) {
      return Invalid("guidance_scale: classifier-free guidance needs a label");
    }
    job.conditioning.guidance_scale = g;
  }
  if (!IsKnownFormat(r.format())) {
    return Invalid(absl::StrCat("format: unknown value ", r.format()));
  }
  const int64_t rows = SampleRowCost(job.sampler, job.num_images,
                                     job.conditioning, model_.num_classes);
  if (rows > options_.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d network evaluations%s = %d rows, "
        "more than this server admits for one request (%d, "
        "--max_queued_rows); ask for fewer images or steps",
        job.num_images, SamplerEvaluations(job.sampler),
        IsGuided(job.conditioning, model_.num_classes) ? " x 2 (guidance)" : "",
        rows, options_.max_request_rows));
  }
  job.seed = PickSeed(r.has_seed(), r.seed());
  return job;
}

absl::StatusOr<ScoreJob> VdmServiceImpl::ToScoreJob(
    const v1::ScoreRequest& r) const {
  ScoreJob job;
  const int n = r.images_size();
  if (n < 1 || n > options_.max_images_per_request) {
    return Invalid(absl::StrFormat("images: %d images, allowed [1, %d]", n,
                                   options_.max_images_per_request));
  }
  if (!IsKnownFormat(r.format())) {
    return Invalid(absl::StrCat("format: unknown value ", r.format()));
  }
  job.timesteps = r.timesteps() == 0 ? kDefaultTimesteps : r.timesteps();
  if (job.timesteps < 2 || job.timesteps > options_.max_timesteps) {
    return Invalid(absl::StrFormat("timesteps: %d is out of range [2, %d]",
                                   r.timesteps(), options_.max_timesteps));
  }
  VDM_ASSIGN_OR_RETURN(job.label, CheckLabel(r.has_label(), r.label()));
  const int64_t rows = ScoreRowCost(n, job.timesteps);
  if (rows > options_.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d timesteps = %d rows, more than "
        "this server admits for one request (%d, --max_queued_rows); send "
        "fewer images per call",
        n, job.timesteps, rows, options_.max_request_rows));
  }
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<Image8> image =
        ImageFromProto(r.images(i), r.format(), &model_.shape);
    if (!image.ok()) {
      return Invalid(absl::StrCat("images[", i, "]: ", image.status().message()));
    }
    job.images.push_back(*std::move(image));
  }
  job.seed = PickSeed(r.has_seed(), r.seed());
  job.shared_noise = r.shared_noise();
  return job;
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
  absl::StatusOr<SampleJob> job = ToSampleJob(*request);
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
  absl::StatusOr<ScoreJob> job = ToScoreJob(*request);
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
