// The admission policies vdm-batching-sim measures continuous batching
// against (docs/design.md, "Admission policies"), behind the engine's
// policy seam (server/admission.h). The server uses none of them.
#ifndef VDM_BENCH_ADMISSION_H_
#define VDM_BENCH_ADMISSION_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "server/admission.h"

namespace vdm {

enum class Admission {
  kContinuous,    // the engine's default: every iteration admits what came
  kRequestLevel,  // only when nothing runs: a batch of requests that
                  // arrived within batch_window of the first (or until
                  // their first passes fill max_batch rows) runs to
                  // completion before the next batch is let in (Triton's
                  // dynamic batcher)
  kOneAtATime,    // only when nothing runs, one request
};

// The policy for `admission` (null for kContinuous: the engine's default).
// A negative window is INVALID_ARGUMENT.
absl::StatusOr<std::unique_ptr<AdmissionPolicy>> MakeAdmissionPolicy(
    Admission admission, int max_batch, absl::Duration batch_window);

}  // namespace vdm

#endif  // VDM_BENCH_ADMISSION_H_
