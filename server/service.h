// The gRPC layer of vdm.v1.VdmService (callback API): validates each
// request, converts it to an engine job, and finishes the RPC from the
// engine's callback. Handlers never block and never run torch.
// Thread-safe: gRPC calls the handlers from many threads.
#ifndef VDM_SERVER_SERVICE_H_
#define VDM_SERVER_SERVICE_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "model/vdm/image.h"
#include "server/engine.h"
#include "server/metrics.h"
#include "vdm/v1/vdm.grpc.pb.h"

namespace vdm {

// What the service tells clients about the served model.
struct ModelDescription {
  ImageShape shape;
  int num_classes = 0;
  std::string prediction;
  std::string metadata;  // JSON
  std::string path;
  std::string device;
  float gamma_min = 0, gamma_max = 0;
  // The model's own test-set BPD (metadata "test_bpd"), the reference of the
  // anomaly score; 0 when unknown.
  double reference_bpd = 0;
};

class VdmServiceImpl final : public v1::VdmService::CallbackService {
 public:
  struct Options {
    int max_images_per_request = 64;  // Sample num_images and ScoreBPD images
    int max_steps = 1000;             // Sample steps
    int max_timesteps = 256;          // ScoreBPD K
    int max_batch = 64;               // reported in GetModelInfo
    // The largest network-row cost of one request (the engine's
    // max_queued_rows): a request that costs more could never be admitted,
    // so it is refused at validation (INVALID_ARGUMENT naming the limit)
    // instead of being told to retry.
    int64_t max_request_rows = 100000;
    // When set, every VdmService call must carry the metadata
    // "authorization: Bearer <auth_token>" (health and reflection stay open).
    std::string auth_token;
  };

  // `engine` and `metrics` must outlive the service.
  VdmServiceImpl(const Options& options, ModelDescription model,
                 Engine* engine, Metrics* metrics)
      : options_(options), model_(std::move(model)), engine_(engine),
        metrics_(metrics) {}

  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* context,
                                   const v1::SampleRequest* request,
                                   v1::SampleResponse* response) override;
  grpc::ServerUnaryReactor* ScoreBPD(grpc::CallbackServerContext* context,
                                     const v1::ScoreRequest* request,
                                     v1::ScoreResponse* response) override;
  grpc::ServerWriteReactor<v1::SampleStreamResponse>* SampleStream(
      grpc::CallbackServerContext* context,
      const v1::SampleRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::ModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

  // From now on new calls get UNAVAILABLE (graceful shutdown).
  void StartDraining() { draining_ = true; }

  // Request validation, public for tests: INVALID_ARGUMENT naming the field
  // and its allowed range.
  absl::StatusOr<SampleJob> ToSampleJob(const v1::SampleRequest& r) const;
  absl::StatusOr<ScoreJob> ToScoreJob(const v1::ScoreRequest& r) const;

 private:
  // UNAVAILABLE while draining, UNAUTHENTICATED without the right token.
  absl::Status Admit(const grpc::CallbackServerContext& context) const;
  absl::StatusOr<int> CheckLabel(bool has_label, int label) const;

  const Options options_;
  const ModelDescription model_;
  Engine* const engine_;
  Metrics* const metrics_;
  std::atomic<bool> draining_{false};
};

// Compares two secrets in time that depends only on their lengths.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace vdm

#endif  // VDM_SERVER_SERVICE_H_
