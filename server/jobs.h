// The engine's vocabulary, free of torch and gRPC: what the service asks the
// engine to do (jobs), what comes back (results, progress) and how the
// caller's state is polled (RequestControl). The service builds jobs from
// requests (service.cc), the engine runs them as tasks (tasks.h), and the
// callbacks carry the results back. See docs/design.md, "Data path".
#ifndef VDM_SERVER_JOBS_H_
#define VDM_SERVER_JOBS_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "model/vdm/image.h"
#include "model/vdm/image_scores.h"
#include "model/vdm/request.h"
#include "model/vdm/sampler_config.h"
#include "model/vdm/thorough.h"
#include "model/vdm/time_proposal.h"

namespace vdm {

class FeatureModel;  // model/vdm/feature_model.h

// Progress of a sampling request, reported after each step.
struct SampleProgress {
  int step = 0;
  int total_steps = 0;
  std::vector<Image8> previews;  // x_hat per image, when a preview is due
};

struct SampleJob {
  int num_images = 1;
  SamplerConfig sampler;      // type, steps, eta (DDIM), time grid
  Conditioning conditioning;  // label (-1 = none) and guidance scale
  uint64_t seed = 0;
  // Editing (SampleEdit in model/vdm/samplers.h): the reference image,
  // SDEdit strength (1 = none; the noise variance fraction sigma^2 of the
  // start, or with strength_is_time the time t, from strength_t) and the
  // inpainting mask (1 where known, H x W), when set.
  std::optional<Image8> reference;
  double strength = 1.0;
  bool strength_is_time = false;
  std::vector<uint8_t> known;
  // Decoding (SampleEdit::z1): one latent per image, C x H x W floats each,
  // the trajectory's start instead of noise; empty = drawn from the seed.
  // RePaint resampling is sampler.resample_rounds.
  std::vector<std::vector<float>> latents;
  // Called after each step when set, off the worker thread, in order and
  // before the result; previews of x_hat every `preview_every` steps
  // (0 = none).
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
  bool pixel_map = false;      // also the per-pixel diffusion term
  // The ELBO's times from the model's proposal (LikelihoodOptions::
  // time_proposal); null = uniform.
  std::shared_ptr<const TimeProposal> time_proposal;
  // kOde: the probability-flow ODE likelihood (ode_likelihood.h) instead;
  // timesteps, shared_noise and pixel_map do not apply.
  ScoreMethod method = ScoreMethod::kElbo;
  OdeOptions ode;  // request.h: solver, tolerances, dequantization, probes
  // The thorough anomaly level (ELBO only): the probes of the calibration
  // (ThoroughSetup) and the feature network; both set, or neither.
  std::optional<ThoroughSetup> thorough;
  std::shared_ptr<const FeatureModel> feature_model;
  // The calibration's training images (the local group's neighbours).
  std::shared_ptr<const FeatureReference> reference;
};

// Network rows a score job of n images costs (ODE rows are forward + VJP).
inline int64_t ScoreJobRowCost(const ScoreJob& job, int64_t n) {
  if (job.method == ScoreMethod::kOde) return OdeRowCost(n, job.ode);
  return ScoreRowCost(n, job.timesteps) +
         (job.thorough ? n * job.thorough->probes() : 0);
}

struct ScoreResult {
  std::vector<ImageBpd> scores;  // model/vdm/image_scores.h
  // Rows evaluated for the request: n K on the model, plus n K on the
  // background model when there is one.
  int64_t network_evaluations = 0;
  double queue_seconds = 0;
  double compute_seconds = 0;
};

// DDIM inversion of images to their latents at t = 1 (EncodePlan in
// model/vdm/samplers.h); sampler.steps and sampler.grid say the grid.
struct EncodeJob {
  std::vector<Image8> images;  // each of the model's shape
  SamplerConfig sampler;
  int label = -1;              // -1 = "no label"
};

struct EncodeResult {
  std::vector<std::vector<float>> latents;  // C x H x W per image
  ImageShape shape;
  int64_t network_evaluations = 0;
  double queue_seconds = 0;
  double compute_seconds = 0;
};

// How the caller's request is doing: polled by the worker every iteration.
struct RequestControl {
  std::function<bool()> is_cancelled;  // may be empty
  absl::Time deadline = absl::InfiniteFuture();
};

// Run exactly once per admitted job, off the worker thread.
using SampleCallback = std::function<void(absl::StatusOr<SampleResult>)>;
using ScoreCallback = std::function<void(absl::StatusOr<ScoreResult>)>;
using EncodeCallback = std::function<void(absl::StatusOr<EncodeResult>)>;

}  // namespace vdm

#endif  // VDM_SERVER_JOBS_H_
