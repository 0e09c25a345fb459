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
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/image_scores.h"
#include "model/vdm/thorough.h"
#include "model/vdm/time_proposal.h"

namespace vdm {

// The server's per-image record (image_scores.h: bpd, its parts,
// complexity, band and, with SetScoring::background, background_bpd, the
// BPD of the same rows under the background model), plus the features.
struct ScoredImage : ImageBpd {
  std::vector<double> features;  // AnomalyFeatures(bpd, complexity, band)
};

class FeatureModel;  // model/vdm/feature_model.h

struct SetScoring {
  int timesteps = 16;
  uint64_t seed = 0;
  int64_t chunk = 64;  // images per request, as vdm-client sends them
  int label = -1;      // the label every row carries; -1 = "no label"
  // The model's time proposal (LikelihoodOptions::time_proposal), as the
  // server applies it when the calibration file has one; null = uniform.
  std::shared_ptr<const TimeProposal> time_proposal;
  bool pixel_map = false;  // keep ImageBpd::pixel_bits (the anomaly_map)
  // A background model (likelihood ratio), evaluated on the model's rows
  // (its z at the model's gamma: common random numbers), as the server
  // does with --background_model. Null = none.
  Denoiser* background = nullptr;
  // The thorough level (all three set, or none): each image also gets its
  // ThoroughFeatures (ReconstructionPlan, MeasureThorough, and the local
  // match against `reference`: local_match.h), as the server computes them.
  std::optional<ThoroughSetup> thorough;
  const FeatureModel* feature_model = nullptr;
  const FeatureReference* reference = nullptr;
  std::function<void(int64_t done, int64_t total)> progress;
};

// images: uint8 [n, C, H, W].
absl::StatusOr<std::vector<ScoredImage>> ScoreSet(Denoiser& model,
                                                  const at::Tensor& images,
                                                  const SetScoring& options);

// The data FitTimeProposal fits a proposal on (time_proposal.h): each image
// of `images` (uint8 [n, C, H, W]) scored with uniform times at K = 2
// fit_bins in G = 2 replicates, so that each replicate puts one (t, eps)
// draw in each of the fit_bins bins; the losses and the control variate's
// values (LikelihoodPlan::row_control) in nats, "no label", in
// chunks of `chunk` images seeded ChunkSeed(seed, c).
absl::StatusOr<ProposalFitData> ProposalFitLosses(
    Denoiser& model, const at::Tensor& images, int fit_bins, uint64_t seed,
    int64_t chunk = 16,
    const std::function<void(int64_t done, int64_t total)>& progress = {});

}  // namespace vdm

#endif  // VDM_TOOLS_ANOMALY_SCORING_H_
