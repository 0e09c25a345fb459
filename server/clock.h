// The engine's sense of time, injectable so that deadlines, queue times and
// simulated forward passes can be tested without sleeping (the fake-clock
// pattern of tensorflow/serving's batching tests; the fake is
// server/testing/fake_clock.h).
#ifndef VDM_SERVER_CLOCK_H_
#define VDM_SERVER_CLOCK_H_

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace vdm {

class Clock {
 public:
  virtual ~Clock() = default;
  virtual absl::Time Now() const = 0;
  // The process-wide wall clock (absl::Now).
  static Clock* Real();
};

inline Clock* Clock::Real() {
  class RealClock : public Clock {
   public:
    absl::Time Now() const override { return absl::Now(); }
  };
  static RealClock* clock = new RealClock();
  return clock;
}

}  // namespace vdm

#endif  // VDM_SERVER_CLOCK_H_
