// When a worker lets queued tasks into its live set (docs/design.md,
// "Admission policies"). The server uses none: continuous batching, every
// iteration admits whatever has arrived. The alternatives that
// vdm-batching-sim measures against it (request-level dynamic batching, one
// request at a time) implement this interface in bench/admission.h.
#ifndef VDM_SERVER_ADMISSION_H_
#define VDM_SERVER_ADMISSION_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/time/time.h"

namespace vdm {

// A task waiting in a worker's queue, as a policy sees it.
struct QueuedTask {
  absl::Time arrival;
  int64_t first_pass = 0;  // rows of its first evaluation (Task::Cost)
};

// Implementations must be thread-safe (each worker asks from its thread).
class AdmissionPolicy {
 public:
  virtual ~AdmissionPolicy() = default;
  // How many of the queued tasks, oldest first, to let in now, with `live`
  // tasks running. Returning 0 with `*recheck` set asks the worker to ask
  // again at that time on the engine's clock, or sooner when more arrive
  // (threaded); in manual mode the caller advances the clock and steps.
  virtual size_t Admit(const std::vector<QueuedTask>& queued, size_t live,
                       absl::Time now, absl::Time* recheck) const = 0;
};

}  // namespace vdm

#endif  // VDM_SERVER_ADMISSION_H_
