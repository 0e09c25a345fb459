#include "server/request_log.h"

#include <glog/logging.h>

#include <random>

#include "absl/strings/str_format.h"

namespace vdm {

std::string NewRequestId() {
  thread_local std::mt19937_64 gen{std::random_device{}()};
  return absl::StrFormat("%016x", gen());
}

RequestLog::RequestLog(grpc::CallbackServerContext* context,
                       const char* method, Metrics* metrics)
    : id_(NewRequestId()),
      method_(method),
      peer_(context->peer()),
      metrics_(metrics),
      start_(absl::Now()) {
  context->AddInitialMetadata("x-request-id", id_);
}

void RequestLog::Done(const absl::Status& status) {
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start_);
  const std::string code = absl::StatusCodeToString(status.code());
  if (metrics_) {
    metrics_->RecordRequest(method_, code, seconds);
    if (!model_.empty()) {
      metrics_->RecordModelRequest(model_, version_, method_, code, rows_);
    }
  }
  std::string line = absl::StrFormat(
      "request id=%s method=%s peer=%s model=%s version=%d images=%d rows=%d "
      "queue_s=%.3f compute_s=%.3f seconds=%.3f code=%s",
      id_, method_, peer_, model_.empty() ? "-" : model_, version_, images_,
      rows_, queue_seconds_, compute_seconds_, seconds, code);
  if (!status.ok()) {
    absl::StrAppendFormat(&line, " error=\"%s\"", status.message());
  }
  if (absl::IsInternal(status) || absl::IsUnknown(status)) {
    LOG(ERROR) << line;
  } else {
    LOG(INFO) << line;
  }
}

}  // namespace vdm
