// The per-image score record (docs/design.md, "Score fields"): what a
// ScoreBPD image gets, in library terms, between the batched tensors of a
// likelihood plan (BpdScores, OdeScores) and the wire (vdm.v1.ImageScore,
// proto/convert.h ScoreToProto). The server's task and the offline tools
// (tools/anomaly_scoring.cc) both build it here, so a new per-image field
// is written once: in the plan that computes it, in the record and its
// filling below, and in the conversion to the proto.
//
// Torch-free to include (the engine's results carry it); the filling
// functions live in image_scores.cc, in the torch library `vdm`.
#ifndef VDM_MODEL_VDM_IMAGE_SCORES_H_
#define VDM_MODEL_VDM_IMAGE_SCORES_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/image.h"

namespace vdm {

struct BpdScores;
struct OdeScores;

// Per-image bits per dimension, its parts and what the anomaly policy reads
// (ImageLikelihood: bpd, complexity, band, background_bpd).
struct ImageBpd : ImageLikelihood {
  double prior = 0, recon = 0, diffusion = 0, stderr_bpd = 0;
  std::vector<float> pixel_bits;  // H x W, when asked for (anomaly_map)
  // ScoreMethod::kOde: bpd is the ODE's; network evaluations per solve,
  // the standard error over the solves (with 2 or more) and the adaptive
  // solver's error estimate. The ELBO parts stay 0 and empty.
  int64_t ode_function_evaluations = 0;
  std::optional<double> ode_stderr_bpd;
  std::optional<double> ode_error_bpd;
};

// The records of an ELBO score of `images` (their complexity is computed
// here); `background`, when given, is the same rows' scores under the
// background model (background_bpd); `pixel_map` keeps the per-pixel term.
absl::StatusOr<std::vector<ImageBpd>> ImageScoresOf(
    const BpdScores& scores, const std::vector<Image8>& images,
    bool pixel_map, const BpdScores* background = nullptr);

// The records of an ODE score: bpd, its evaluations and standard error.
std::vector<ImageBpd> ImageScoresOf(const OdeScores& scores);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_IMAGE_SCORES_H_
