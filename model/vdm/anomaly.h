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
// Thread-safe: Calibration is immutable after Fit/FromJson.
#ifndef VDM_MODEL_VDM_ANOMALY_H_
#define VDM_MODEL_VDM_ANOMALY_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/image.h"

namespace vdm {

constexpr int kBands = 4;

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
  };

  // Fits the Gaussian to `features` (n rows of the same length, n > length)
  // with a small ridge for stability, and keeps the sorted scores of the
  // calibration images for p-values.
  static absl::StatusOr<Calibration> Fit(
      const std::vector<std::vector<double>>& features, const Setup& setup);
  static absl::StatusOr<Calibration> FromJson(const std::string& json);
  std::string ToJson() const;

  const Setup& setup() const { return setup_; }
  size_t dimension() const { return mean_.size(); }
  size_t size() const { return sorted_scores_.size(); }

  // Negative log-density of `features` (nats); higher = more anomalous.
  double Score(const std::vector<double>& features) const;
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

}  // namespace vdm

#endif  // VDM_MODEL_VDM_ANOMALY_H_
