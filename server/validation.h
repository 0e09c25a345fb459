// Request validation, free of torch and of the RPC machinery: a vdm.v1
// request and the served model's description in, an engine job (jobs.h) or
// INVALID_ARGUMENT naming the field and its allowed range out. The service
// calls it on the gRPC handler thread; the request fuzzer
// (tests/fuzz/validation_fuzzer.cc) calls it on arbitrary bytes.
// Stateless and thread-safe.
#ifndef VDM_SERVER_VALIDATION_H_
#define VDM_SERVER_VALIDATION_H_

#include <cstdint>
#include <string>

#include <memory>

#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/image.h"
#include "model/vdm/time_proposal.h"
#include "server/jobs.h"
#include "vdm/v1/vdm.pb.h"

namespace vdm {

class FeatureModel;  // model/vdm/feature_model.h

// What the service knows about the served model.
struct ModelDescription {
  ImageShape shape;
  int num_classes = 0;
  std::string prediction;
  std::string metadata;  // JSON
  std::string path;
  std::string device;
  int64_t parameters = 0;  // of one replica
  float gamma_min = 0, gamma_max = 0;
  // What the replicas compute in (GetModelInfo): "fp32" or "bf16" for
  // sampling, and for ScoreBPD rows.
  std::string precision = "fp32", score_precision = "fp32";
  // With --precision=auto: why `precision` won, and the measured rates.
  std::string precision_choice;
  double fp32_rows_per_second = 0, bf16_rows_per_second = 0;
  // The replicas (one worker each) and intra-op threads per replica.
  int replicas = 1, threads_per_replica = 1;
  // The anomaly calibration loaded with the model (anomaly.h), or null.
  std::shared_ptr<const Calibration> calibration;
  // The proposal over diffusion times from the same calibration file
  // (time_proposal.h): ELBO scores use it unless the request asks for
  // uniform times. Null = none.
  std::shared_ptr<const TimeProposal> time_proposal;
  // The background model of the likelihood ratio; empty = none.
  std::string background_path;
  // The thorough anomaly level: the calibration's anomaly.thorough section
  // and the feature network found beside the model; it is served when both
  // are there.
  std::shared_ptr<const ThoroughCalibration> thorough;
  std::shared_ptr<const FeatureModel> feature_model;
  std::string feature_model_path;
};

// Per-request limits (vdm-server flags of the same names).
struct RequestLimits {
  int max_images_per_request = 64;  // Sample num_images and ScoreBPD images
  int max_steps = 1000;             // Sample steps
  int max_timesteps = 256;          // ScoreBPD K
  // The largest network-row cost of one request (the engine's
  // max_queued_rows): a request that costs more could never be admitted, so
  // it is refused here (INVALID_ARGUMENT naming the limit) instead of being
  // told to retry.
  int64_t max_request_rows = 100000;
};

absl::StatusOr<SampleJob> ToSampleJob(const v1::SampleRequest& request,
                                      const RequestLimits& limits,
                                      const ModelDescription& model);
absl::StatusOr<EncodeJob> ToEncodeJob(const v1::EncodeRequest& request,
                                      const RequestLimits& limits,
                                      const ModelDescription& model);
absl::StatusOr<ScoreJob> ToScoreJob(const v1::ScoreRequest& request,
                                    const RequestLimits& limits,
                                    const ModelDescription& model);

}  // namespace vdm

#endif  // VDM_SERVER_VALIDATION_H_
