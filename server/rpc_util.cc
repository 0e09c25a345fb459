#include "server/rpc_util.h"

#include <chrono>
#include <string>

#include "model/vdm/status_macros.h"
#include "proto/convert.h"

namespace vdm {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()),
                      std::string(status.message()));
}

RequestControl ControlOf(grpc::CallbackServerContext* context) {
  RequestControl control;
  control.is_cancelled = [context] { return context->IsCancelled(); };
  const auto deadline = context->deadline();
  if (deadline < std::chrono::system_clock::time_point::max()) {
    control.deadline = absl::FromChrono(deadline);
  }
  return control;
}

absl::Status FillSampleResponse(const SampleResult& result,
                                v1::ImageFormat format, uint64_t seed,
                                v1::SampleResponse* response) {
  for (const Image8& image : result.images) {
    VDM_RETURN_IF_ERROR(ImageToProto(image, format, response->add_images()));
  }
  response->set_seed(seed);
  response->set_network_evaluations(result.network_evaluations);
  response->set_queue_seconds(result.queue_seconds);
  response->set_compute_seconds(result.compute_seconds);
  return absl::OkStatus();
}

}  // namespace vdm
