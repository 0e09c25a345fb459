// Small conversions shared by the RPC handlers: status codes, deadlines and
// cancellation, and responses. Stateless and thread-safe.
#ifndef VDM_SERVER_RPC_UTIL_H_
#define VDM_SERVER_RPC_UTIL_H_

#include "absl/status/status.h"
#include "grpcpp/grpcpp.h"
#include "server/jobs.h"
#include "vdm/v1/vdm.pb.h"

namespace vdm {

// absl::Status -> grpc::Status (the codes are the same numbers).
grpc::Status ToGrpcStatus(const absl::Status& status);

// The call's cancellation and deadline, for the engine to poll. The context
// must outlive the request's task (it does: the RPC finishes from the task).
RequestControl ControlOf(grpc::CallbackServerContext* context);

// Fills a SampleResponse from the engine's result.
absl::Status FillSampleResponse(const SampleResult& result,
                                v1::ImageFormat format, uint64_t seed,
                                v1::SampleResponse* response);

}  // namespace vdm

#endif  // VDM_SERVER_RPC_UTIL_H_
