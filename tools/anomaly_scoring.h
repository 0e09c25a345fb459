// Scoring a set of images for the anomaly tools (vdm-calibrate,
// vdm-ood-eval) exactly as the server scores a ScoreBPD request: the
// library's ScoreImages (LikelihoodPlan) in requests of `chunk` images with
// seeds ChunkSeed(seed, c), "no label", independent noise, then the anomaly
// features of model/vdm/anomaly.h. Thread-compatible.
#ifndef VDM_TOOLS_ANOMALY_SCORING_H_
#define VDM_TOOLS_ANOMALY_SCORING_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/image_scores.h"

namespace vdm {

// The server's per-image record (image_scores.h: bpd, its parts,
// complexity, band and, with SetScoring::background, background_bpd, the
// BPD of the same rows under the background model), plus the features.
struct ScoredImage : ImageBpd {
  std::vector<double> features;  // AnomalyFeatures(bpd, complexity, band)
};

struct SetScoring {
  int timesteps = 16;
  uint64_t seed = 0;
  int64_t chunk = 64;  // images per request, as vdm-client sends them
  int label = -1;      // the label every row carries; -1 = "no label"
  bool pixel_map = false;  // keep ImageBpd::pixel_bits (the anomaly_map)
  // A background model (likelihood ratio), evaluated on the model's rows
  // (its z at the model's gamma: common random numbers), as the server
  // does with --background_model. Null = none.
  Denoiser* background = nullptr;
  std::function<void(int64_t done, int64_t total)> progress;
};

// images: uint8 [n, C, H, W].
absl::StatusOr<std::vector<ScoredImage>> ScoreSet(Denoiser& model,
                                                  const at::Tensor& images,
                                                  const SetScoring& options);

}  // namespace vdm

#endif  // VDM_TOOLS_ANOMALY_SCORING_H_
