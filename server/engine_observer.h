// What the engine tells the world about its work: the seam through which
// metrics (server/metrics.h, prometheus-cpp) and tests watch it, so the
// engine itself depends on neither. Every method has a no-op default.
//
// Thread-safe implementations only: workers, the completion thread and
// Submit's callers call them concurrently.
#ifndef VDM_SERVER_ENGINE_OBSERVER_H_
#define VDM_SERVER_ENGINE_OBSERVER_H_

#include <cstdint>

namespace vdm {

class EngineObserver {
 public:
  virtual ~EngineObserver() = default;

  // A task was admitted to a worker's queue.
  virtual void OnAdmitted(const char* /*method*/) {}
  // A task got its first forward pass `seconds` after it arrived.
  virtual void OnQueueTime(const char* /*method*/, double /*seconds*/) {}
  // A task left early: reason "deadline" or "cancelled".
  virtual void OnCancelled(const char* /*reason*/) {}
  // One forward pass (plain or forward + VJP) of `rows` rows.
  virtual void OnBatch(int /*rows*/, int /*max_batch*/,
                       double /*forward_seconds*/) {}
  // Rows evaluated, on the model or the background model.
  virtual void OnEvaluated(int64_t /*rows*/) {}
  // A worker's load after an iteration: tasks queued and live, rows
  // admitted and not yet evaluated.
  virtual void OnWorkerLoad(int /*worker*/, double /*queued*/,
                            double /*live*/, double /*queued_rows*/) {}
  // One iteration of a worker: seconds in forward passes and around them.
  virtual void OnWorkerSeconds(int /*worker*/, double /*forward*/,
                               double /*host*/) {}
  // The completion thread delivered one result or progress message.
  virtual void OnCompletionSeconds(double /*seconds*/) {}
};

}  // namespace vdm

#endif  // VDM_SERVER_ENGINE_OBSERVER_H_
