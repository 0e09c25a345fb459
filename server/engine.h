// The continuous-batching engine (design.md section 6). Free of torch and
// gRPC in its interface: the service hands it plain job descriptions and gets
// plain results back through callbacks.
//
// One worker thread per device owns a model replica. Each iteration it
// gathers up to `max_batch` rows from every live request (a sampling
// trajectory at its current step, both halves of a guided pair, a scoring
// evaluation at its own time t), runs one forward pass and advances each
// request. New requests join at the next iteration; cancelled or expired
// ones leave at the next iteration.
//
// Thread-safe: Submit* may be called from any thread.
#ifndef VDM_SERVER_ENGINE_H_
#define VDM_SERVER_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "model/vdm/image_io.h"
#include "model/vdm/sampler_config.h"

namespace vdm {

class Denoiser;
class Metrics;
class Worker;

// Progress of a sampling request, reported after each step.
struct SampleProgress {
  int step = 0;
  int total_steps = 0;
  std::vector<Image8> previews;  // x_hat per image, when a preview is due
};

struct SampleJob {
  int num_images = 1;
  SamplerConfig sampler;        // type, steps, eta (DDIM), time grid
  float guidance_scale = 1.0f;  // used only with a label
  int label = -1;               // -1 = unconditional ("no label")
  uint64_t seed = 0;
  // Called on the worker thread after each step when set; previews of x_hat
  // every `preview_every` steps (0 = none). Must not block.
  std::function<void(SampleProgress)> progress;
  int preview_every = 0;
};

struct SampleResult {
  std::vector<Image8> images;
  int64_t network_evaluations = 0;
  double queue_seconds = 0;
  double compute_seconds = 0;
};

struct ScoreJob {
  std::vector<Image8> images;  // each of the model's shape
  int timesteps = 16;          // K >= 2 stratified times
  uint64_t seed = 0;
  int label = -1;              // -1 = "no label"
  bool shared_noise = false;   // common random numbers across images
};

// Per-image bits per dimension and its parts.
struct ImageBpd {
  double bpd = 0, prior = 0, recon = 0, diffusion = 0, stderr_bpd = 0;
};

struct ScoreResult {
  std::vector<ImageBpd> scores;
  int64_t network_evaluations = 0;
  double queue_seconds = 0;
  double compute_seconds = 0;
};

// How the caller's request is doing: polled by the worker every iteration.
struct RequestControl {
  std::function<bool()> is_cancelled;  // may be empty
  absl::Time deadline = absl::InfiniteFuture();
};

class Engine {
 public:
  struct Options {
    int max_batch = 64;             // rows per forward pass
    int64_t max_queued_rows = 100000;  // admitted, unfinished rows per worker
    bool score_priority = false;    // ScoreBPD rows go first in each batch
  };
  using SampleCallback = std::function<void(absl::StatusOr<SampleResult>)>;
  using ScoreCallback = std::function<void(absl::StatusOr<ScoreResult>)>;

  // One worker per replica; `metrics` may be null and must outlive the engine.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(
      const Options& options,
      std::vector<std::unique_ptr<Denoiser>> replicas, Metrics* metrics);
  ~Engine();  // Stops the workers; unfinished requests fail with UNAVAILABLE.

  // Admits a job or returns RESOURCE_EXHAUSTED (queue full) / UNAVAILABLE
  // (stopped) at once. The callback runs exactly once, on a worker thread,
  // unless Submit returned an error.
  absl::Status SubmitSample(const SampleJob& job, RequestControl control,
                            SampleCallback done);
  absl::Status SubmitScore(ScoreJob job, RequestControl control,
                           ScoreCallback done);

  // Stops admitting, fails every unfinished request with UNAVAILABLE and
  // joins the workers. Idempotent.
  void Stop();

  // Total rows evaluated so far (all workers).
  int64_t network_evaluations() const;
  // Blocks until no request is admitted or running, or until `deadline`.
  // Returns true when idle.
  bool WaitIdle(absl::Time deadline);

 private:
  explicit Engine(const Options& options);
  Worker* LeastLoaded();

  const Options options_;
  std::vector<std::unique_ptr<Worker>> workers_;
};

}  // namespace vdm

#endif  // VDM_SERVER_ENGINE_H_
