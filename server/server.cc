#include "server/server.h"

#include <torch/script.h>

#include <future>

#include "absl/strings/str_cat.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/torchscript_model.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

constexpr char kServiceName[] = "vdm.v1.VdmService";

// Describes the loaded model for GetModelInfo and the anomaly score.
absl::StatusOr<ModelDescription> Describe(TorchScriptModel& model,
                                          const std::string& device) {
  ModelDescription d;
  d.shape = model.shape();
  d.num_classes = model.num_classes();
  d.prediction = model.prediction();
  d.metadata = model.metadata();
  d.path = model.path();
  d.device = device;
  VDM_ASSIGN_OR_RETURN(GammaValues g,
                       model.Gamma(torch::tensor({0.0f, 1.0f})));
  d.gamma_min = g.gamma[0].item<float>();
  d.gamma_max = g.gamma[1].item<float>();
  const auto meta = nlohmann::json::parse(d.metadata, nullptr, false);
  if (meta.is_object() && meta.contains("test_bpd") &&
      meta["test_bpd"].is_number()) {
    d.reference_bpd = meta["test_bpd"].get<double>();
  }
  return d;
}

}  // namespace

absl::StatusOr<std::unique_ptr<VdmServer>> VdmServer::Create(
    const Options& options) {
  if (options.devices.empty()) {
    return absl::InvalidArgumentError("devices: at least one device is needed");
  }
  SetTorchThreads(options.threads);
  std::unique_ptr<VdmServer> server(new VdmServer());
  server->metrics_ = std::make_unique<Metrics>();
  if (!options.metrics_address.empty()) {
    VDM_RETURN_IF_ERROR(server->metrics_->Expose(options.metrics_address));
  }
  std::vector<std::unique_ptr<Denoiser>> replicas;
  absl::StatusOr<ModelDescription> description;
  for (const std::string& device : options.devices) {
    VDM_ASSIGN_OR_RETURN(
        std::unique_ptr<TorchScriptModel> model,
        TorchScriptModel::Load({options.model_path, device, true}));
    if (replicas.empty()) description = Describe(*model, device);
    replicas.push_back(std::move(model));
  }
  if (!description.ok()) return description.status();
  VDM_ASSIGN_OR_RETURN(server->engine_,
                       Engine::Create(options.engine, std::move(replicas),
                                      server->metrics_.get()));
  server->service_ = std::make_unique<VdmServiceImpl>(
      options.limits, *std::move(description), server->engine_.get(),
      server->metrics_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.address, grpc::InsecureServerCredentials(),
                           &server->port_);
  builder.SetMaxReceiveMessageSize(options.max_message_bytes);
  builder.SetMaxSendMessageSize(options.max_message_bytes);
  builder.RegisterService(server->service_.get());
  server->server_ = builder.BuildAndStart();
  if (!server->server_ || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", options.address));
  }
  server->SetServing(false);
  VDM_RETURN_IF_ERROR(server->WarmUp());
  server->SetServing(true);
  return server;
}

VdmServer::~VdmServer() { Shutdown(absl::ZeroDuration()); }

// One small request through the whole engine, so the first real caller does
// not pay for lazy initialisation.
absl::Status VdmServer::WarmUp() {
  SampleJob job;
  job.num_images = 1;
  job.steps = 2;
  std::promise<absl::Status> done;
  VDM_RETURN_IF_ERROR(engine_->SubmitSample(
      job, RequestControl{}, [&done](absl::StatusOr<SampleResult> r) {
        done.set_value(r.status());
      }));
  absl::Status status = done.get_future().get();
  if (!status.ok()) {
    return absl::Status(status.code(),
                        absl::StrCat("warm-up failed: ", status.message()));
  }
  return absl::OkStatus();
}

void VdmServer::SetServing(bool serving) {
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health == nullptr) return;
  health->SetServingStatus(serving);  // all services, "" included
  health->SetServingStatus(kServiceName, serving);
}

void VdmServer::Shutdown(absl::Duration grace) {
  if (shut_down_.exchange(true)) return;
  if (server_) {
    SetServing(false);
    server_->Shutdown(absl::ToChronoTime(absl::Now() + grace));
  }
  if (engine_) engine_->Stop();
}

void VdmServer::Wait() {
  if (server_) server_->Wait();
}

}  // namespace vdm
