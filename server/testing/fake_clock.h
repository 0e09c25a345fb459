// A Clock (server/clock.h) that moves only when told to: for the engine's
// tests and the batching simulation (bench/), never the server.
#ifndef VDM_SERVER_TESTING_FAKE_CLOCK_H_
#define VDM_SERVER_TESTING_FAKE_CLOCK_H_

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "server/clock.h"

namespace vdm {

// A clock that moves only when told to. Thread-safe.
class FakeClock : public Clock {
 public:
  explicit FakeClock(absl::Time start = absl::UnixEpoch()) : now_(start) {}
  absl::Time Now() const override {
    absl::MutexLock lock(&mu_);
    return now_;
  }
  void Advance(absl::Duration d) {
    absl::MutexLock lock(&mu_);
    now_ += d;
  }

 private:
  mutable absl::Mutex mu_;
  absl::Time now_ ABSL_GUARDED_BY(mu_);
};

}  // namespace vdm

#endif  // VDM_SERVER_TESTING_FAKE_CLOCK_H_
