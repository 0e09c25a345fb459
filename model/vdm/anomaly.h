// Anomaly scores from the likelihood pass, free of torch (docs/design.md,
// "Anomaly scores"). The raw BPD ranks simple out-of-distribution images as
// more normal than real ones (Nalisnick et al. 2019); the features here fix
// that at no extra network cost:
//
// - complexity: the bits per dimension of the image as a maximally
//   compressed PNG (Serra et al. 2020); bpd - complexity is the
//   complexity-corrected BPD;
// - the band profile: the diffusion term split into kBands equal bands of t
//   (t in [b/B, (b+1)/B); the bands sum to the diffusion term), so that
//   images that differ at particular noise levels stand out;
// - a calibration: a Gaussian with full covariance fitted to the feature
//   vectors [bpd - complexity, band_0 .. band_{B-1}] of held-out training
//   images, scored with the same K, options and code the server uses. The
//   anomaly score is the negative log-density under it; the p-value is the
//   fraction of calibration images scoring at least as high.
//
// ScoreAnomalies below is the one anomaly policy: the server's ScoreBPD,
// vdm-calibrate and vdm-ood-eval turn likelihood results into anomaly
// fields with it.
//
// Thread-safe: Calibration is immutable after Fit/FromJson; the free
// functions are pure.
#ifndef VDM_MODEL_VDM_ANOMALY_H_
#define VDM_MODEL_VDM_ANOMALY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/image.h"
#include "nlohmann/json_fwd.hpp"
#include "model/vdm/request.h"

namespace vdm {

constexpr int kBands = 4;

// How much work an anomaly score gets (ScoreRequest.anomaly_level): kFast,
// the ELBO's own features (K rows per image); kThorough, also one-step
// reconstructions and a perceptual feature model (thorough.h).
enum class AnomalyLevel { kFast, kThorough };
const char* AnomalyLevelName(AnomalyLevel level);  // "fast", "thorough"

// The false-positive rate at which images are flagged when a request names
// none (ScoreRequest.false_positive_rate unset).
constexpr double kDefaultFalsePositiveRate = 0.01;

// Bits per dimension of `image` as a PNG at zlib level 9.
absl::StatusOr<double> ComplexityBpd(const Image8& image);

// The feature vector the calibration models.
std::vector<double> AnomalyFeatures(double bpd, double complexity_bpd,
                                    const std::vector<double>& band_bpd);

class Calibration {
 public:
  // What the calibration set was scored with; a request is scored with the
  // calibration only when it matches (else its calibrated fields are unset).
  struct Setup {
    int timesteps = 16;
    bool shared_noise = false;
    uint64_t seed = 0;
    std::string data;  // where the images came from (provenance)
    // The features were computed with the calibration file's time proposal
    // (time_proposal.h). The proposal changes the estimate's noise, and so
    // the spread the Gaussian learnt: a request scored without it must not
    // use this calibration (and the other way round).
    bool time_proposal = false;
  };

  // Fits the Gaussian to `features` (n rows of the same length, n > length)
  // with a small ridge for stability, and keeps the sorted scores of the
  // calibration images for p-values.
  static absl::StatusOr<Calibration> Fit(
      const std::vector<std::vector<double>>& features, const Setup& setup);
  // A calibration file (calibration_file.h), version 1 or 2: its
  // "anomaly.fast" section (an error when it has none).
  static absl::StatusOr<Calibration> FromJson(const std::string& json);
  // A version 2 calibration file with this calibration as its only section.
  std::string ToJson() const;
  // The section itself ("anomaly.fast", or a version 1 document's top
  // level); errors name the field.
  // `dimension`: the feature count the section must have (the fast
  // level's 1 + kBands unless a thorough group says otherwise).
  static absl::StatusOr<Calibration> FromJsonValue(
      const nlohmann::json& j, size_t dimension = 1 + kBands);
  void ToJsonValue(nlohmann::json* j) const;

  const Setup& setup() const { return setup_; }
  size_t dimension() const { return mean_.size(); }
  const std::vector<double>& mean() const { return mean_; }
  size_t size() const { return sorted_scores_.size(); }

  // Negative log-density of `features` (nats); higher = more anomalous.
  double Score(const std::vector<double>& features) const;
  // The squared Mahalanobis distance of `features` from the mean.
  double SquaredDistance(const std::vector<double>& features) const;
  // (1 + #calibration scores >= score) / (n + 1), in (0, 1]. An image is
  // flagged at false-positive rate a when PValue <= a: for images
  // exchangeable with the calibration set that happens with probability at
  // most a (floor((n + 1) a) / (n + 1)), the conformal guarantee.
  double PValue(double score) const;
  // Typicality of a set (Nalisnick et al. 2019, "Detecting
  // out-of-distribution inputs ... using typicality"): the p-value that m
  // calibration-like images would have a mean score at least as far above
  // the calibration mean as `scores` has, from `resamples` bootstrap draws
  // of m calibration scores (a fixed seed: deterministic).
  double BatchPValue(const std::vector<double>& scores,
                     int resamples = 2000) const;

 private:
  Setup setup_;
  std::vector<double> mean_;
  std::vector<double> cholesky_;  // lower triangle L of the covariance, row-major
  double log_normalizer_ = 0;     // 0.5 log det(2 pi Sigma)
  std::vector<double> sorted_scores_;
};

// What the thorough level measures of an image besides the ELBO
// (thorough.h; the server's ScoreTask fills it).
struct ThoroughFeatures {
  std::vector<float> embedding;        // the feature model's, of the image
  std::vector<double> recon_error;     // per probe time: MSE of x_hat
  std::vector<double> recon_distance;  // per probe time: feature distance
  // The local match map (AddLocalMatch), local_height x local_width cells:
  // per cell, the distance of the image's local features to the nearest
  // cell near the same place in its nearest training images.
  std::vector<float> local_map;
  int64_t local_height = 0, local_width = 0;
  // H x W: the local match map upsampled to pixels, the thorough level's
  // anomaly_map.
  std::vector<float> map;
};

// One image's likelihood results, as far as the anomaly policy reads them.
struct ImageLikelihood {
  double bpd = 0;
  double complexity = 0;      // ComplexityBpd
  std::vector<double> band;   // kBands, summing to the diffusion term
  // With a background model: the BPD of the same rows under it.
  std::optional<double> background_bpd;
  // Scored at the thorough level.
  std::optional<ThoroughFeatures> thorough;
};

// How a batch was scored, and the rate the request flags at.
struct AnomalyRequest {
  ScoreMethod method = ScoreMethod::kElbo;
  int timesteps = 16;
  bool shared_noise = false;
  // Scored with the model's time proposal (time_proposal.h).
  bool time_proposal = false;
  double false_positive_rate = kDefaultFalsePositiveRate;
  AnomalyLevel level = AnomalyLevel::kFast;
};

// The anomaly fields of one image (vdm.v1.ImageScore).
struct ImageAnomaly {
  std::optional<double> anomaly_score;  // absent with the ODE
  std::optional<double> p_value;        // calibrated only
  std::optional<bool> is_anomaly;       // calibrated only
  std::optional<double> llr;            // with a background_bpd only
  // The thorough level's (with its calibration): the mean distance to the
  // k nearest training images in the feature model's space, the mean
  // squared error of the one-step reconstructions over the probe times, and
  // the mean of the largest cells of the local match map.
  std::optional<double> feature_distance;
  std::optional<double> reconstruction_error;
  std::optional<double> local_distance;
};

// The anomaly fields of a batch: one ImageAnomaly per image, in order, and
// the batch's (vdm.v1.ScoreResponse.batch_p_value).
struct BatchAnomaly {
  std::vector<ImageAnomaly> images;
  std::optional<double> batch_p_value;
};

// Whether `calibration` applies to images scored as `request` says: by the
// ELBO, with the calibration set's K, noise option and time proposal (or
// uniform times).
bool CalibrationApplies(const Calibration& calibration,
                        const AnomalyRequest& request);

// (1 + #sorted >= score) / (n + 1): the conformal p-value of `score` among
// the calibration scores `sorted` (ascending).
double ConformalPValue(const std::vector<double>& sorted, double score);
// Calibration::BatchPValue over the calibration scores `sorted`.
double BootstrapBatchPValue(const std::vector<double>& sorted,
                            const std::vector<double>& scores, int resamples);

class ThoroughCalibration;  // thorough.h

// The anomaly policy. With the ODE (no ELBO parts, no features) every field
// is absent. Otherwise, per image: llr = bpd - background_bpd when there is
// a background_bpd; with a `calibration` that applies (CalibrationApplies),
// anomaly_score = its Score of AnomalyFeatures, p_value = its PValue and
// is_anomaly = p_value <= false_positive_rate; else (null or not applying)
// anomaly_score = bpd - complexity and no p_value or flag. With a
// calibration that applies and two or more images, batch_p_value is its
// BatchPValue of the scores. At the thorough level the same rules hold with
// `thorough` in place of `calibration` (the images must carry `thorough`
// features; without a thorough calibration that applies, the fast rules
// are used), and feature_distance, reconstruction_error and local_distance
// are set.
BatchAnomaly ScoreAnomalies(const std::vector<ImageLikelihood>& images,
                            const Calibration* calibration,
                            const AnomalyRequest& request,
                            const ThoroughCalibration* thorough = nullptr);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_ANOMALY_H_
