#include "bench/admission.h"

#include <vector>

namespace vdm {
namespace {

class RequestLevel : public AdmissionPolicy {
 public:
  RequestLevel(int max_batch, absl::Duration window)
      : max_batch_(max_batch), window_(window) {}

  size_t Admit(const std::vector<QueuedTask>& queued, size_t live,
               absl::Time now, absl::Time* recheck) const override {
    if (live > 0 || queued.empty()) return 0;
    int64_t width = 0;
    for (const QueuedTask& q : queued) width += q.first_pass;
    // The batch closes `window_` after its first request arrived, or as
    // soon as the queued requests' first passes fill max_batch rows.
    const absl::Time closes = queued.front().arrival + window_;
    if (now < closes && width < max_batch_) {
      *recheck = closes;
      return 0;
    }
    // In arrival order, up to max_batch rows of first passes (at least one).
    size_t n = 0;
    width = 0;
    while (n < queued.size() &&
           (n == 0 || width + queued[n].first_pass <= max_batch_)) {
      width += queued[n++].first_pass;
    }
    return n;
  }

 private:
  const int max_batch_;
  const absl::Duration window_;
};

class OneAtATime : public AdmissionPolicy {
 public:
  size_t Admit(const std::vector<QueuedTask>& queued, size_t live, absl::Time,
               absl::Time*) const override {
    return live == 0 && !queued.empty() ? 1 : 0;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<AdmissionPolicy>> MakeAdmissionPolicy(
    Admission admission, int max_batch, absl::Duration batch_window) {
  if (batch_window < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("batch_window must be >= 0");
  }
  switch (admission) {
    case Admission::kContinuous:
      return nullptr;
    case Admission::kRequestLevel:
      return std::make_unique<RequestLevel>(max_batch, batch_window);
    case Admission::kOneAtATime:
      return std::make_unique<OneAtATime>();
  }
  return absl::InvalidArgumentError("unknown admission policy");
}

}  // namespace vdm
