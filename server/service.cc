#include "server/service.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/image_io.h"
#include "model/vdm/request.h"
#include "model/vdm/status_macros.h"
#include "proto/convert.h"
#include "server/request_log.h"
#include "server/rpc_util.h"
#include "server/tasks.h"
#include "server/validation.h"

namespace vdm {
namespace {

// Finishes a unary RPC and records it (request_log.h). Copies share the
// record.
class Finisher {
 public:
  Finisher(grpc::CallbackServerContext* context, Metrics* metrics,
           const char* method)
      : reactor_(context->DefaultReactor()),
        log_(std::make_shared<RequestLog>(context, method, metrics)) {}
  grpc::ServerUnaryReactor* reactor() const { return reactor_; }
  RequestLog& log() const { return *log_; }
  void operator()(const absl::Status& status) const {
    log_->Done(status);
    reactor_->Finish(ToGrpcStatus(status));
  }

 private:
  grpc::ServerUnaryReactor* reactor_;
  std::shared_ptr<RequestLog> log_;
};

// The per-pixel map as floats and as a gray PNG scaled to its maximum.
absl::Status FillAnomalyMap(const std::vector<float>& bits,
                            const ImageShape& shape, v1::ImageScore* out) {
  float top = 0;
  for (float b : bits) {
    out->add_anomaly_map(b);
    top = std::max(top, b);
  }
  Image8 heat{1, shape.height, shape.width, std::vector<uint8_t>(bits.size())};
  for (size_t i = 0; i < bits.size(); ++i) {
    heat.pixels[i] = static_cast<uint8_t>(
        top > 0 ? std::lround(255.0f * std::max(0.0f, bits[i]) / top) : 0);
  }
  VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(heat));
  out->set_anomaly_map_png(std::move(png));
  return absl::OkStatus();
}

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
  const Finisher finish(context, metrics_, "Sample");
  grpc::ServerUnaryReactor* reactor = finish.reactor();
  absl::StatusOr<std::shared_ptr<const ServedModel>> served =
      AdmitAndResolve(*context, *request, finish.log());
  if (!served.ok()) {
    finish(served.status());
    return reactor;
  }
  const std::shared_ptr<const ServedModel> model = *std::move(served);
  absl::StatusOr<SampleJob> job =
      ToSampleJob(*request, options_, model->description);
  if (!job.ok()) {
    finish(job.status());
    return reactor;
  }
  const v1::ImageFormat format = request->format();
  const uint64_t seed = job->seed;
  finish.log().SetImages(job->num_images);
  Metrics* metrics = metrics_;
  auto done = [finish, format, seed, response, metrics,
               model](absl::StatusOr<SampleResult> r) {
        if (!r.ok()) return finish(r.status());
        finish.log().SetResult(r->network_evaluations, r->queue_seconds,
                               r->compute_seconds);
        response->set_model(model->name);
        response->set_model_version(model->version);
        absl::Status s = FillSampleResponse(*r, format, seed, response);
        if (s.ok() && metrics) metrics->AddImagesGenerated(r->images.size());
        finish(s);
      };
  const int num_classes = model->description.num_classes;
  absl::Status admitted = engine_->Submit(
      MakeSampleTask(*std::move(job), num_classes, std::move(done)),
      ControlOf(context), model->engine_model);
  if (!admitted.ok()) finish(admitted);
  return reactor;
}

grpc::ServerUnaryReactor* VdmServiceImpl::ScoreBPD(
    grpc::CallbackServerContext* context, const v1::ScoreRequest* request,
    v1::ScoreResponse* response) {
  const Finisher finish(context, metrics_, "ScoreBPD");
  grpc::ServerUnaryReactor* reactor = finish.reactor();
  absl::StatusOr<std::shared_ptr<const ServedModel>> served =
      AdmitAndResolve(*context, *request, finish.log());
  if (!served.ok()) {
    finish(served.status());
    return reactor;
  }
  const std::shared_ptr<const ServedModel> model = *std::move(served);
  absl::StatusOr<ScoreJob> job =
      ToScoreJob(*request, options_, model->description);
  if (!job.ok()) {
    finish(job.status());
    return reactor;
  }
  const uint64_t seed = job->seed;
  finish.log().SetImages(static_cast<int64_t>(job->images.size()));
  // The anomaly policy (anomaly.h) decides whether the calibration applies.
  // (The callback holds `model`, so its calibration outlives the call.)
  const Calibration* calibration = model->description.calibration.get();
  AnomalyRequest policy;
  policy.method = job->method;
  policy.timesteps = job->timesteps;
  policy.shared_noise = job->shared_noise;
  policy.time_proposal = job->time_proposal != nullptr;
  policy.level =
      job->thorough ? AnomalyLevel::kThorough : AnomalyLevel::kFast;
  const ThoroughCalibration* thorough = model->description.thorough.get();
  if (request->has_false_positive_rate()) {
    policy.false_positive_rate = request->false_positive_rate();
  }
  const ImageShape shape = model->description.shape;
  Metrics* metrics = metrics_;
  auto done =
      [finish, seed, calibration, thorough, policy, shape, response, metrics,
       model](absl::StatusOr<ScoreResult> r) {
        if (!r.ok()) return finish(r.status());
        response->set_model(model->name);
        response->set_model_version(model->version);
        finish.log().SetResult(r->network_evaluations, r->queue_seconds,
                               r->compute_seconds);
        const std::vector<ImageLikelihood> likelihoods(r->scores.begin(),
                                                       r->scores.end());
        const BatchAnomaly anomaly =
            ScoreAnomalies(likelihoods, calibration, policy, thorough);
        for (size_t i = 0; i < r->scores.size(); ++i) {
          const ImageBpd& s = r->scores[i];
          const ImageAnomaly& a = anomaly.images[i];
          v1::ImageScore* out = response->add_scores();
          ScoreToProto(s, a, out);
          if (a.is_anomaly && metrics) {
            metrics->RecordAnomaly(*a.anomaly_score, *a.is_anomaly);
          }
          if (!s.pixel_bits.empty()) {
            // The thorough level's map is its local match map.
            const absl::Status map = FillAnomalyMap(
                policy.level == AnomalyLevel::kThorough && s.thorough
                    ? s.thorough->map
                    : s.pixel_bits,
                shape, out);
            if (!map.ok()) return finish(map);
          }
          if (metrics) metrics->RecordBpd(s.bpd);
        }
        if (anomaly.batch_p_value) {
          response->set_batch_p_value(*anomaly.batch_p_value);
        }
        response->set_seed(seed);
        response->set_network_evaluations(r->network_evaluations);
        response->set_queue_seconds(r->queue_seconds);
        response->set_compute_seconds(r->compute_seconds);
        if (metrics) metrics->AddImagesScored(r->scores.size());
        finish(absl::OkStatus());
      };
  absl::Status admitted =
      engine_->Submit(MakeScoreTask(*std::move(job), std::move(done)),
                      ControlOf(context), model->engine_model);
  if (!admitted.ok()) finish(admitted);
  return reactor;
}

grpc::ServerUnaryReactor* VdmServiceImpl::Encode(
    grpc::CallbackServerContext* context, const v1::EncodeRequest* request,
    v1::EncodeResponse* response) {
  const Finisher finish(context, metrics_, "Encode");
  grpc::ServerUnaryReactor* reactor = finish.reactor();
  absl::StatusOr<std::shared_ptr<const ServedModel>> served =
      AdmitAndResolve(*context, *request, finish.log());
  if (!served.ok()) {
    finish(served.status());
    return reactor;
  }
  const std::shared_ptr<const ServedModel> model = *std::move(served);
  absl::StatusOr<EncodeJob> job =
      ToEncodeJob(*request, options_, model->description);
  if (!job.ok()) {
    finish(job.status());
    return reactor;
  }
  finish.log().SetImages(static_cast<int64_t>(job->images.size()));
  auto done =
      [finish, response, model](absl::StatusOr<EncodeResult> r) {
        if (!r.ok()) return finish(r.status());
        response->set_model(model->name);
        response->set_model_version(model->version);
        finish.log().SetResult(r->network_evaluations, r->queue_seconds,
                               r->compute_seconds);
        for (const std::vector<float>& z : r->latents) {
          LatentToProto(z, r->shape, response->add_latents());
        }
        response->set_network_evaluations(r->network_evaluations);
        response->set_queue_seconds(r->queue_seconds);
        response->set_compute_seconds(r->compute_seconds);
        finish(absl::OkStatus());
      };
  absl::Status admitted =
      engine_->Submit(MakeEncodeTask(*std::move(job), std::move(done)),
                      ControlOf(context), model->engine_model);
  if (!admitted.ok()) finish(admitted);
  return reactor;
}

grpc::ServerUnaryReactor* VdmServiceImpl::GetModelInfo(
    grpc::CallbackServerContext* context, const v1::ModelInfoRequest* request,
    v1::ModelInfo* response) {
  const Finisher finish(context, metrics_, "GetModelInfo");
  grpc::ServerUnaryReactor* reactor = finish.reactor();
  absl::StatusOr<std::shared_ptr<const ServedModel>> served =
      AdmitAndResolve(*context, *request, finish.log());
  if (!served.ok()) {
    finish(served.status());
    return reactor;
  }
  const ServedModel& served_model = **served;
  const ModelDescription& model = served_model.description;
  response->set_image_channels(model.shape.channels);
  response->set_image_height(model.shape.height);
  response->set_image_width(model.shape.width);
  response->set_num_classes(model.num_classes);
  response->set_prediction(model.prediction);
  response->set_metadata(model.metadata);
  response->set_model_path(model.path);
  response->set_device(model.device);
  response->set_gamma_min(model.gamma_min);
  response->set_gamma_max(model.gamma_max);
  response->set_max_batch(options_.max_batch);
  response->set_max_images_per_request(options_.max_images_per_request);
  response->set_max_steps(options_.max_steps);
  response->set_max_timesteps(options_.max_timesteps);
  response->set_background_model_path(model.background_path);
  response->set_precision(model.precision);
  response->set_score_precision(model.score_precision);
  response->set_precision_choice(model.precision_choice);
  response->set_fp32_rows_per_second(model.fp32_rows_per_second);
  response->set_bf16_rows_per_second(model.bf16_rows_per_second);
  response->set_replicas(model.replicas);
  response->set_threads_per_replica(model.threads_per_replica);
  if (model.calibration) {
    response->set_calibrated(true);
    response->set_calibration_timesteps(model.calibration->setup().timesteps);
    response->set_calibration_shared_noise(
        model.calibration->setup().shared_noise);
    response->set_calibration_images(
        static_cast<int>(model.calibration->size()));
    response->set_calibration_time_proposal(
        model.calibration->setup().time_proposal);
  }
  if (model.thorough && model.feature_model) {
    response->set_thorough_available(true);
    response->set_thorough_evaluations_per_image(
        static_cast<int32_t>(model.thorough->setup().evaluations_per_image()));
    response->set_feature_model_path(model.feature_model_path);
  }
  if (model.time_proposal) {
    response->set_time_proposal(true);
    response->set_time_proposal_bins(model.time_proposal->bins());
  }
  response->set_model_name(served_model.name);
  response->set_model_version(served_model.version);
  response->set_is_default(served_model.name == repository_->default_model());
  response->set_memory_bytes(served_model.memory_bytes);
  finish(absl::OkStatus());
  return reactor;
}

grpc::ServerUnaryReactor* VdmServiceImpl::ListModels(
    grpc::CallbackServerContext* context, const v1::ListModelsRequest*,
    v1::ListModelsResponse* response) {
  const Finisher finish(context, metrics_, "ListModels");
  grpc::ServerUnaryReactor* reactor = finish.reactor();
  if (absl::Status s = Admit(*context); !s.ok()) {
    finish(s);
    return reactor;
  }
  for (const VersionStatus& v : repository_->List()) {
    v1::ModelVersionStatus* out = response->add_models();
    out->set_name(v.name);
    out->set_version(v.version);
    switch (v.state) {
      case VersionState::kLoading:
        out->set_state(v1::ModelVersionStatus::LOADING);
        break;
      case VersionState::kReady:
        out->set_state(v1::ModelVersionStatus::READY);
        break;
      case VersionState::kFailed:
        out->set_state(v1::ModelVersionStatus::FAILED);
        break;
      case VersionState::kUnloading:
        out->set_state(v1::ModelVersionStatus::UNLOADING);
        break;
    }
    out->set_error(v.error);
    out->set_memory_bytes(v.memory_bytes);
    out->set_is_default(v.is_default);
  }
  response->set_default_model(repository_->default_model());
  finish(absl::OkStatus());
  return reactor;
}

}  // namespace vdm
