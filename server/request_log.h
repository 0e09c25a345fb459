// One record per RPC: a request id that the caller gets back as response
// metadata ("x-request-id", to quote in a bug report), the Prometheus
// request counters and latency, and one structured log line (glog) when the
// call ends:
//   request id=5c1e0b7a9f3d2e61 method=Sample peer=ipv4:127.0.0.1:40112
//     model=fmnist version=1 images=4 rows=400 queue_s=0.002 compute_s=0.511 seconds=0.515 code=OK
// Errors add error="..."; INTERNAL and UNKNOWN are logged as errors, the
// rest at INFO. Thread-compatible: filled on the handler thread, finished
// once on the engine's completion thread (or the handler's).
#ifndef VDM_SERVER_REQUEST_LOG_H_
#define VDM_SERVER_REQUEST_LOG_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/metrics.h"

namespace vdm {

class RequestLog {
 public:
  // Sends the fresh request id as initial metadata on `context`.
  RequestLog(grpc::CallbackServerContext* context, const char* method,
             Metrics* metrics);

  const std::string& id() const { return id_; }
  void SetImages(int64_t n) { images_ = n; }
  // The model version the request runs on (vdm_model_requests_total).
  void SetModel(const std::string& name, int64_t version) {
    model_ = name;
    version_ = version;
  }
  void SetResult(int64_t rows, double queue_seconds, double compute_seconds) {
    rows_ = rows;
    queue_seconds_ = queue_seconds;
    compute_seconds_ = compute_seconds;
  }
  // Records the call (metrics and the log line). Call once.
  void Done(const absl::Status& status);

 private:
  const std::string id_;
  const char* const method_;
  const std::string peer_;
  Metrics* const metrics_;
  const absl::Time start_;
  std::string model_;
  int64_t version_ = 0;
  int64_t images_ = 0, rows_ = 0;
  double queue_seconds_ = 0, compute_seconds_ = 0;
};

// 16 random hex digits.
std::string NewRequestId();

}  // namespace vdm

#endif  // VDM_SERVER_REQUEST_LOG_H_
