// An EngineObserver (server/engine_observer.h) that counts what the engine
// did and lets a test wait for it, without sleeping: how many rows were
// evaluated, how many tasks admitted. Pass it as Engine::Options::observer
// or VdmServer::Options::observer. Thread-safe.
#ifndef VDM_SERVER_TESTING_ENGINE_EVENTS_H_
#define VDM_SERVER_TESTING_ENGINE_EVENTS_H_

#include <cstdint>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/engine_observer.h"

namespace vdm {

class EngineEvents : public EngineObserver {
 public:
  void OnAdmitted(const char*) override {
    absl::MutexLock lock(&mu_);
    ++admitted_;
  }
  void OnEvaluated(int64_t rows) override {
    absl::MutexLock lock(&mu_);
    rows_ += rows;
  }

  // Block until at least `rows` rows were evaluated (`jobs` tasks ever
  // admitted), or until `deadline` (real time); false on the deadline.
  bool AwaitEvaluations(int64_t rows, absl::Time deadline) {
    return Await(&rows_, rows, deadline);
  }
  bool AwaitAdmitted(int64_t jobs, absl::Time deadline) {
    return Await(&admitted_, jobs, deadline);
  }
  int64_t evaluations() const {
    absl::MutexLock lock(&mu_);
    return rows_;
  }

 private:
  bool Await(const int64_t* count, int64_t at_least, absl::Time deadline) {
    absl::MutexLock lock(&mu_);
    auto reached = [count, at_least]() { return *count >= at_least; };
    return mu_.AwaitWithDeadline(absl::Condition(&reached), deadline);
  }

  mutable absl::Mutex mu_;
  int64_t rows_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t admitted_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace vdm

#endif  // VDM_SERVER_TESTING_ENGINE_EVENTS_H_
