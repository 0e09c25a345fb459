// The gRPC layer of vdm.v1.VdmService (callback API): resolves the model
// version each request names (model_repository.h), validates the request
// against it, converts it to an engine job on that version, and finishes
// the RPC from the engine's callback. Handlers never block and never run
// torch.
// Thread-safe: gRPC calls the handlers from many threads.
#ifndef VDM_SERVER_SERVICE_H_
#define VDM_SERVER_SERVICE_H_

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "grpcpp/grpcpp.h"
#include "server/engine.h"
#include "server/metrics.h"
#include "server/model_repository.h"
#include "server/request_log.h"
#include "server/validation.h"
#include "vdm/v1/vdm.grpc.pb.h"

namespace vdm {

class VdmServiceImpl final : public v1::VdmService::CallbackService {
 public:
  // The request limits (validation.h) plus what only the service needs.
  struct Options : RequestLimits {
    int max_batch = 64;               // reported in GetModelInfo
    // When set, every VdmService call must carry the metadata
    // "authorization: Bearer <auth_token>" (health and reflection stay open).
    std::string auth_token;
  };

  // `repository`, `engine` and `metrics` must outlive the service.
  VdmServiceImpl(const Options& options, const ModelRepository* repository,
                 Engine* engine, Metrics* metrics)
      : options_(options), repository_(repository), engine_(engine),
        metrics_(metrics) {}

  grpc::ServerUnaryReactor* Sample(grpc::CallbackServerContext* context,
                                   const v1::SampleRequest* request,
                                   v1::SampleResponse* response) override;
  grpc::ServerUnaryReactor* ScoreBPD(grpc::CallbackServerContext* context,
                                     const v1::ScoreRequest* request,
                                     v1::ScoreResponse* response) override;
  grpc::ServerUnaryReactor* Encode(grpc::CallbackServerContext* context,
                                   const v1::EncodeRequest* request,
                                   v1::EncodeResponse* response) override;
  grpc::ServerWriteReactor<v1::SampleStreamResponse>* SampleStream(
      grpc::CallbackServerContext* context,
      const v1::SampleRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::ModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* ListModels(
      grpc::CallbackServerContext* context,
      const v1::ListModelsRequest* request,
      v1::ListModelsResponse* response) override;

  // From now on new calls get UNAVAILABLE (graceful shutdown).
  void StartDraining() { draining_ = true; }

 private:
  // UNAVAILABLE while draining, UNAUTHENTICATED without the right token.
  absl::Status Admit(const grpc::CallbackServerContext& context) const;

  // Admit, then the version the request's `model` and `version` fields
  // name, recorded in `log`.
  template <class Request>
  absl::StatusOr<std::shared_ptr<const ServedModel>> AdmitAndResolve(
      const grpc::CallbackServerContext& context, const Request& request,
      RequestLog& log) const {
    if (absl::Status s = Admit(context); !s.ok()) return s;
    absl::StatusOr<std::shared_ptr<const ServedModel>> served =
        repository_->Resolve(request.model(),
                             request.has_version()
                                 ? std::optional<int64_t>(request.version())
                                 : std::nullopt);
    if (served.ok()) log.SetModel((*served)->name, (*served)->version);
    return served;
  }

  const Options options_;
  const ModelRepository* const repository_;
  Engine* const engine_;
  Metrics* const metrics_;
  std::atomic<bool> draining_{false};
};

// Compares two secrets in time that depends only on their lengths.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b);

}  // namespace vdm

#endif  // VDM_SERVER_SERVICE_H_
