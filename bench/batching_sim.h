// The batching simulation behind vdm-batching-sim (docs/performance.md,
// "Continuous batching against request-level batching"): the real engine and
// tasks in manual mode on a FakeClock, with a stand-in network whose forward
// pass costs `fixed + per_row * rows` of fake time and returns zeros. Every
// request is submitted at its own arrival time on the fake clock, also when
// that falls inside a forward pass (as on a server, it joins the engine's
// queue then), so the run is deterministic and much faster than real time.
#ifndef VDM_BENCH_BATCHING_SIM_H_
#define VDM_BENCH_BATCHING_SIM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "bench/admission.h"
#include "server/engine.h"
#include "server/jobs.h"

namespace vdm {

// The simulated network: 1x8x8 images, 10 classes (label 10 = "no label").
struct CostModel {
  absl::Duration fixed;    // a: per forward pass
  absl::Duration per_row;  // b: per row
};

struct SimRequest {
  absl::Duration arrival;  // since the start of the run
  int kind = 0;            // the caller's label for it (statistics)
  bool is_score = false;
  SampleJob sample;  // when !is_score
  ScoreJob score;    // when is_score
  int64_t images() const {
    return is_score ? static_cast<int64_t>(score.images.size())
                    : sample.num_images;
  }
};

struct SimBatch {
  absl::Duration start;  // since the start of the run
  int64_t rows = 0;
};

struct SimOutcome {
  // Per request, in trace order: callback time minus arrival.
  std::vector<absl::Duration> latency;
  std::vector<SimBatch> batches;  // every forward pass, in order
  absl::Duration end;             // the last callback, since the start
  absl::Duration busy;            // total forward time
  int64_t rows = 0;
};

// How the simulated engine admits requests (bench/admission.h).
struct SimPolicy {
  Admission admission = Admission::kContinuous;
  absl::Duration batch_window = absl::Milliseconds(5);  // kRequestLevel
};

// Runs `trace` (sorted by arrival) through an engine with `options` (clock,
// threaded, admission and max_queued_rows are set here) under `policy`.
// Fails when a request is refused or fails, or when the engine stalls.
absl::StatusOr<SimOutcome> Simulate(Engine::Options options,
                                    const SimPolicy& policy,
                                    const CostModel& cost,
                                    const std::vector<SimRequest>& trace);

}  // namespace vdm

#endif  // VDM_BENCH_BATCHING_SIM_H_
