// One-step reconstructions of images from fixed noise levels: the rows of
// the `thorough` anomaly level (docs/anomaly.md, "The thorough level").
//
// For each image and probe p = (time t_j, draw d): z = alpha_t f + sigma_t
// eps_{j,d}, one network row, and the denoiser's prediction x_hat = (z -
// sigma_t eps_hat) / alpha_t. How far x_hat lands from the image says how
// well the model "knows" what the image looks like at that noise level
// (Graham et al. 2023 reconstruct from several noise levels; the one-step
// prediction is their cheapest form). The noise eps_{j,d} is drawn once
// from a fixed seed and shared by every image (common random numbers), so
// an image's features do not depend on the request's seed or neighbours.
//
// Like LikelihoodPlan, the rows can be handed out in any chunking (RowsAt)
// and given back in any order (Consume). Not thread-safe; CPU tensors.
#ifndef VDM_MODEL_VDM_RECONSTRUCTION_H_
#define VDM_MODEL_VDM_RECONSTRUCTION_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/image_scores.h"
#include "model/vdm/rows.h"
#include "model/vdm/schedule.h"
#include "model/vdm/thorough.h"

namespace vdm {

struct ReconstructionOptions {
  // The noise levels, each in (0, 1) (ThoroughSetup holds the served
  // choice and why).
  std::vector<double> times;
  int draws = 1;          // noise draws per time
  uint64_t seed = 0;      // the shared noise
  int64_t probes() const {
    return static_cast<int64_t>(times.size()) * draws;
  }
};

// The probes a thorough calibration was fitted with.
ReconstructionOptions ProbesOf(const ThoroughSetup& setup);

// An error naming the field when the options are unusable.
absl::Status CheckReconstructionOptions(const ReconstructionOptions& options);

class ReconstructionPlan {
 public:
  // x_uint8 [n, C, H, W] (integer, 0..255); labels [n] int64 (num_classes =
  // "no label") or undefined. Evaluates `schedule` once at the times.
  static absl::StatusOr<std::unique_ptr<ReconstructionPlan>> Create(
      const at::Tensor& x_uint8, const at::Tensor& labels,
      const ReconstructionOptions& options, const ScheduleFn& schedule);

  int64_t num_images() const { return f_.size(0); }
  int64_t probes() const { return options_.probes(); }
  const ReconstructionOptions& options() const { return options_; }
  // Row r = i * P + p: image i, probe p = j * draws + d.
  int64_t rows() const { return num_images() * probes(); }
  absl::StatusOr<Rows> RowsAt(int64_t begin, int64_t count) const;
  absl::Status Consume(int64_t begin, const at::Tensor& eps_hat);
  bool complete() const { return received_ == rows(); }

  // Once complete():
  // the reconstructions as uint8 images [n, P, C, H, W];
  at::Tensor reconstructions() const;
  // per image and time, the mean squared error of x_hat in model space
  // over pixels and draws, [n, J] float64;
  at::Tensor errors() const;
  // per pixel, the squared error summed over channels and averaged over the
  // probes, [n, H, W] float64: where the reconstructions disagree with the
  // image.
  at::Tensor error_map() const;

 private:
  explicit ReconstructionPlan(const ReconstructionOptions& options)
      : options_(options) {}

  const ReconstructionOptions options_;
  at::Tensor f_;        // [n, C, H, W] float32 model space
  at::Tensor labels_;   // [n] int64 or undefined
  at::Tensor gamma_;    // [P] float32, probe p at times[p / draws]
  at::Tensor eps_;      // [P, C, H, W] float32, shared by every image
  at::Tensor x_hat_;    // [n P, C, H, W] float32
  std::vector<bool> got_;
  int64_t received_ = 0;
};

class FeatureModel;  // feature_model.h

// The thorough level's features of the plan's images (x_uint8, the images
// the plan was made of), once it is complete: the feature network's
// embedding of each image, the reconstruction errors per time (errors()),
// and per time the mean over draws of the Euclidean distance between the
// embeddings of x_hat and of the image.
absl::StatusOr<std::vector<ThoroughFeatures>> MeasureThorough(
    const ReconstructionPlan& plan, const at::Tensor& x_uint8,
    const FeatureModel& net);

// MeasureThorough's features into the plan's images' records (`records`,
// in order): the server's ScoreTask and the anomaly tools share it (and then
// AddLocalMatch, local_match.h, for the local group and the map).
absl::Status AddThoroughFeatures(const ReconstructionPlan& plan,
                                 const at::Tensor& x_uint8,
                                 const FeatureModel& net,
                                 std::vector<ImageBpd>* records);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_RECONSTRUCTION_H_
