// The `thorough` anomaly level (docs/anomaly.md, "The thorough level"),
// free of torch: what it measures per image beyond the ELBO, and the
// calibration that turns it into a score with a p-value.
//
// Features, in four groups, each chosen from the literature issue 23 cites:
// - fast: the fast level's [bpd - complexity, band_0..3] (Serra et al.
//   2020; the multi-scale profile of Mahmood et al. 2021);
// - knn: log of the mean distance from the image's perceptual features to
//   its k nearest training images (the feature-kNN baseline; a perceptual
//   network trained on the model's own training split);
// - recon_error: per noise level t_j, log of the mean squared error of the
//   one-step reconstruction x_hat (Graham et al. 2023's reconstruction
//   from several noise levels, in its one-step form);
// - recon_distance: per t_j, log of the mean perceptual distance between
//   x_hat and the image (their LPIPS, with the feature network instead).
// Each group gets a Gaussian with full covariance fitted to held-out
// training images. The three profile groups are two-sided (too typical and
// too odd both count): a group's squared Mahalanobis distance m
// (chi-squared with d degrees of freedom for a Gaussian image) becomes an
// upper-tail p by the Wilson-Hilferty normal approximation. The kNN group is
// one-sided, p = Phi(-z) of the log distance's standard score: being nearer
// to the training images than usual is what typical means. (The first
// evaluation had it two-sided; docs/anomaly.md reports both.) The groups
// combine by Fisher's
// method, score = -2 sum_g log p_g: one group far out is enough, which a
// single Gaussian over all features would dilute among its dimensions. The
// served p-value is conformal, from the calibration images' scores.
//
// Thread-safe: ThoroughCalibration is immutable after Fit/FromJsonValue.
#ifndef VDM_MODEL_VDM_THOROUGH_H_
#define VDM_MODEL_VDM_THOROUGH_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "nlohmann/json_fwd.hpp"

namespace vdm {

// The probes and the neighbourhood: fixed at calibration, read by the
// server from the calibration so both measure the same thing.
struct ThoroughSetup {
  // The one-step probes' noise levels: the high-noise end, where the
  // shipped schedule hides an image's structure (issue 23's probe: the
  // one-step error separates at t >= 0.7 and is at chance at t <= 0.5).
  std::vector<double> times = {0.6, 0.7, 0.8, 0.9};
  int draws = 2;              // noise draws per time (shared by all images)
  uint64_t probe_seed = 23;   // their noise
  int knn_k = 5;              // neighbours in the feature space
  // The model's ELBO part, as for the fast level.
  Calibration::Setup elbo;
  std::string feature_model;  // provenance: the file it was fitted with
  // The probe rows per image, and with the ELBO's all rows per image.
  int64_t probes() const { return static_cast<int64_t>(times.size()) * draws; }
  int64_t evaluations_per_image() const { return elbo.timesteps + probes(); }
};

class ThoroughCalibration {
 public:
  static constexpr int kGroups = 4;
  static const char* GroupName(int g);  // fast, knn, recon_error, recon_distance

  // Fits the groups to `images` (each with `thorough` set), whose embeddings
  // are measured against `reference` (row-major [N, D] float32, D =
  // dimension, the training images' features). Needs more images than the
  // largest group has features + 1, and N > knn_k.
  static absl::StatusOr<ThoroughCalibration> Fit(
      const std::vector<ImageLikelihood>& images,
      std::vector<float> reference, int64_t dimension,
      const ThoroughSetup& setup);
  static absl::StatusOr<ThoroughCalibration> FromJsonValue(
      const nlohmann::json& j);
  void ToJsonValue(nlohmann::json* j) const;

  const ThoroughSetup& setup() const { return setup_; }
  int64_t dimension() const { return dimension_; }
  int64_t reference_size() const {
    return dimension_ > 0 ? static_cast<int64_t>(reference_.size()) / dimension_
                          : 0;
  }
  size_t size() const { return sorted_scores_.size(); }

  // The mean Euclidean distance from `embedding` (dimension()) to its knn_k
  // nearest reference rows.
  double KnnDistance(const std::vector<float>& embedding) const;
  // Per group, its z: the Wilson-Hilferty z of its squared Mahalanobis
  // distance, for the kNN group the signed standard score (about N(0, 1)
  // for calibration-like images; NaN when a feature is missing or
  // non-finite).
  // `knn_distance`, when given, gets the KnnDistance it computed.
  std::vector<double> GroupZ(const ImageLikelihood& image,
                             double* knn_distance = nullptr) const;
  // Fisher's combination, -2 sum_g log p_g with p_g = Phi(-z_g); higher =
  // more anomalous. `knn_distance` as for GroupZ.
  double Score(const ImageLikelihood& image,
               double* knn_distance = nullptr) const;
  double PValue(double score) const;
  double BatchPValue(const std::vector<double>& scores) const;

 private:
  std::vector<std::vector<double>> GroupFeatures(
      const ImageLikelihood& image, double* knn_distance = nullptr) const;

  ThoroughSetup setup_;
  std::vector<float> reference_;  // [N, D]
  int64_t dimension_ = 0;
  std::vector<Calibration> groups_;  // kGroups Gaussians
  std::vector<double> sorted_scores_;
};

// Whether a thorough calibration applies to a request (the fast level's
// rule for its ELBO part).
bool ThoroughApplies(const ThoroughCalibration& calibration,
                     const AnomalyRequest& request);

// log Phi(-z), the log upper tail of a standard normal, accurate far out.
double LogUpperTail(double z);
// The Wilson-Hilferty z of a chi-squared value m with d degrees of freedom.
double ChiSquaredZ(double m, double d);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_THOROUGH_H_
