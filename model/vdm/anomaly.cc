#include "model/vdm/anomaly.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/image_io.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/thorough.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

constexpr double kPi = 3.14159265358979323846;

// In-place Cholesky of a symmetric positive definite d x d matrix (row-major);
// false when it is not positive definite.
bool Cholesky(std::vector<double>& a, size_t d) {
  for (size_t j = 0; j < d; ++j) {
    double s = a[j * d + j];
    for (size_t k = 0; k < j; ++k) s -= a[j * d + k] * a[j * d + k];
    if (!(s > 0)) return false;
    a[j * d + j] = std::sqrt(s);
    for (size_t i = j + 1; i < d; ++i) {
      double v = a[i * d + j];
      for (size_t k = 0; k < j; ++k) v -= a[i * d + k] * a[j * d + k];
      a[i * d + j] = v / a[j * d + j];
    }
    for (size_t k = j + 1; k < d; ++k) a[j * d + k] = 0;
  }
  return true;
}

}  // namespace

const char* AnomalyLevelName(AnomalyLevel level) {
  return level == AnomalyLevel::kThorough ? "thorough" : "fast";
}

absl::StatusOr<double> ComplexityBpd(const Image8& image) {
  VDM_ASSIGN_OR_RETURN(const std::string png, EncodePng(image, 9));
  const double dims = static_cast<double>(image.shape().dims());
  return 8.0 * static_cast<double>(png.size()) / dims;
}

std::vector<double> AnomalyFeatures(double bpd, double complexity_bpd,
                                    const std::vector<double>& band_bpd) {
  std::vector<double> f = {bpd - complexity_bpd};
  f.insert(f.end(), band_bpd.begin(), band_bpd.end());
  return f;
}

absl::StatusOr<Calibration> Calibration::Fit(
    const std::vector<std::vector<double>>& features, const Setup& setup) {
  const size_t n = features.size();
  const size_t d = n > 0 ? features[0].size() : 0;
  if (d == 0 || n <= d + 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration needs more images than features + 1: ", n, " images of ",
        d, " features"));
  }
  Calibration c;
  c.setup_ = setup;
  c.mean_.assign(d, 0.0);
  for (const auto& f : features) {
    if (f.size() != d) {
      return absl::InvalidArgumentError("calibration features differ in length");
    }
    for (size_t j = 0; j < d; ++j) c.mean_[j] += f[j] / n;
  }
  std::vector<double> cov(d * d, 0.0);
  for (const auto& f : features) {
    for (size_t i = 0; i < d; ++i) {
      for (size_t j = 0; j < d; ++j) {
        cov[i * d + j] += (f[i] - c.mean_[i]) * (f[j] - c.mean_[j]) / (n - 1);
      }
    }
  }
  // A ridge of 1e-6 of the mean variance keeps near-collinear features
  // (the bands sum to most of the BPD) from making it singular.
  double trace = 0;
  for (size_t i = 0; i < d; ++i) trace += cov[i * d + i];
  for (size_t i = 0; i < d; ++i) cov[i * d + i] += 1e-6 * trace / d + 1e-12;
  if (!Cholesky(cov, d)) {
    return absl::InvalidArgumentError(
        "calibration features have a singular covariance");
  }
  c.cholesky_ = cov;
  double log_det = 0;
  for (size_t i = 0; i < d; ++i) log_det += 2 * std::log(cov[i * d + i]);
  c.log_normalizer_ = 0.5 * (d * std::log(2 * kPi) + log_det);
  for (const auto& f : features) c.sorted_scores_.push_back(c.Score(f));
  std::sort(c.sorted_scores_.begin(), c.sorted_scores_.end());
  return c;
}

double Calibration::Score(const std::vector<double>& x) const {
  return 0.5 * SquaredDistance(x) + log_normalizer_;
}

double Calibration::SquaredDistance(const std::vector<double>& x) const {
  const size_t d = mean_.size();
  if (x.size() != d) return std::numeric_limits<double>::quiet_NaN();
  // Solve L y = x - mean; the squared Mahalanobis distance is |y|^2.
  std::vector<double> y(d);
  double q = 0;
  for (size_t i = 0; i < d; ++i) {
    double v = x[i] - mean_[i];
    for (size_t k = 0; k < i; ++k) v -= cholesky_[i * d + k] * y[k];
    y[i] = v / cholesky_[i * d + i];
    q += y[i] * y[i];
  }
  return q;
}

double ConformalPValue(const std::vector<double>& sorted, double score) {
  const auto first = std::lower_bound(sorted.begin(), sorted.end(), score);
  const double at_least = static_cast<double>(sorted.end() - first);
  return (1.0 + at_least) / (sorted.size() + 1.0);
}

double Calibration::PValue(double score) const {
  return ConformalPValue(sorted_scores_, score);
}

double Calibration::BatchPValue(const std::vector<double>& scores,
                                int resamples) const {
  return BootstrapBatchPValue(sorted_scores_, scores, resamples);
}

double BootstrapBatchPValue(const std::vector<double>& sorted_scores_,
                            const std::vector<double>& scores, int resamples) {
  const size_t m = scores.size();
  if (m == 0 || sorted_scores_.empty() || resamples < 1) return 1.0;
  double observed = 0;
  for (double s : scores) observed += s / m;
  std::mt19937_64 gen(12345);
  std::uniform_int_distribution<size_t> pick(0, sorted_scores_.size() - 1);
  int at_least = 0;
  for (int r = 0; r < resamples; ++r) {
    double mean = 0;
    for (size_t i = 0; i < m; ++i) mean += sorted_scores_[pick(gen)] / m;
    at_least += mean >= observed;
  }
  return (1.0 + at_least) / (resamples + 1.0);
}

void Calibration::ToJsonValue(nlohmann::json* out) const {
  nlohmann::json& j = *out;
  j["model"] = "gaussian, full covariance";
  if (mean_.size() == 1 + kBands) {
    j["features"] = {"bpd - complexity_bpd", "band_bpd[0..3] (t in quarters)"};
  }
  j["bands"] = kBands;
  j["timesteps"] = setup_.timesteps;
  j["shared_noise"] = setup_.shared_noise;
  j["time_proposal"] = setup_.time_proposal;
  j["seed"] = setup_.seed;
  j["data"] = setup_.data;
  j["mean"] = mean_;
  j["cholesky"] = cholesky_;
  j["log_normalizer"] = log_normalizer_;
  j["sorted_scores"] = sorted_scores_;
}

std::string Calibration::ToJson() const {
  CalibrationFile file;
  file.anomaly = std::make_shared<const Calibration>(*this);
  return CalibrationFileToJson(file);
}

absl::StatusOr<Calibration> Calibration::FromJson(const std::string& text) {
  VDM_ASSIGN_OR_RETURN(const CalibrationFile file, ParseCalibrationFile(text));
  if (file.anomaly == nullptr) {
    return absl::InvalidArgumentError(
        "calibration: the file has no anomaly.fast section");
  }
  return *file.anomaly;
}

absl::StatusOr<Calibration> Calibration::FromJsonValue(const nlohmann::json& j,
                                                       size_t dimension) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError("calibration: not a JSON object");
  }
  Calibration c;
  try {
    c.setup_.timesteps = j.at("timesteps").get<int>();
    c.setup_.shared_noise = j.at("shared_noise").get<bool>();
    // Absent in version 1 files, which predate the proposal.
    c.setup_.time_proposal = j.value("time_proposal", false);
    c.setup_.seed = j.at("seed").get<uint64_t>();
    c.setup_.data = j.value("data", "");
    c.mean_ = j.at("mean").get<std::vector<double>>();
    c.cholesky_ = j.at("cholesky").get<std::vector<double>>();
    c.log_normalizer_ = j.at("log_normalizer").get<double>();
    c.sorted_scores_ = j.at("sorted_scores").get<std::vector<double>>();
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration: ", e.what()));
  }
  const size_t d = c.mean_.size();
  if (d == 0 || c.cholesky_.size() != d * d || c.sorted_scores_.empty() ||
      j.value("bands", 0) != kBands || d != dimension ||
      !std::is_sorted(c.sorted_scores_.begin(), c.sorted_scores_.end())) {
    return absl::InvalidArgumentError(
        "calibration: inconsistent sizes (mean, covariance, bands, scores)");
  }
  for (size_t i = 0; i < d; ++i) {
    if (!(c.cholesky_[i * d + i] > 0)) {
      return absl::InvalidArgumentError("calibration: covariance not positive");
    }
  }
  return c;
}

bool CalibrationApplies(const Calibration& calibration,
                        const AnomalyRequest& request) {
  return request.method == ScoreMethod::kElbo &&
         calibration.setup().timesteps == request.timesteps &&
         calibration.setup().shared_noise == request.shared_noise &&
         calibration.setup().time_proposal == request.time_proposal;
}

BatchAnomaly ScoreAnomalies(const std::vector<ImageLikelihood>& images,
                            const Calibration* calibration,
                            const AnomalyRequest& request,
                            const ThoroughCalibration* thorough) {
  BatchAnomaly out;
  out.images.resize(images.size());
  if (request.method != ScoreMethod::kElbo) return out;
  if (calibration != nullptr && !CalibrationApplies(*calibration, request)) {
    calibration = nullptr;
  }
  if (request.level != AnomalyLevel::kThorough ||
      (thorough != nullptr && !ThoroughApplies(*thorough, request))) {
    thorough = nullptr;
  }
  for (const ImageLikelihood& s : images) {
    if (!s.thorough) thorough = nullptr;
  }
  std::vector<double> scores;
  for (size_t i = 0; i < images.size(); ++i) {
    const ImageLikelihood& s = images[i];
    ImageAnomaly& a = out.images[i];
    if (s.background_bpd) a.llr = s.bpd - *s.background_bpd;
    if (thorough != nullptr) {
      const ThoroughFeatures& t = *s.thorough;
      double error = 0;
      for (double e : t.recon_error) error += e / t.recon_error.size();
      a.reconstruction_error = error;
      double distance = 0;
      const double score = thorough->Score(s, &distance);
      a.feature_distance = distance;
      a.local_distance =
          std::exp(LocalMapFeature(t.local_map, thorough->setup().local_top));
      a.anomaly_score = score;
      a.p_value = thorough->PValue(score);
      a.is_anomaly = *a.p_value <= request.false_positive_rate;
      scores.push_back(score);
      continue;
    }
    if (calibration == nullptr) {
      a.anomaly_score = s.bpd - s.complexity;
      continue;
    }
    const double score =
        calibration->Score(AnomalyFeatures(s.bpd, s.complexity, s.band));
    a.anomaly_score = score;
    a.p_value = calibration->PValue(score);
    a.is_anomaly = *a.p_value <= request.false_positive_rate;
    scores.push_back(score);
  }
  if (thorough != nullptr && scores.size() >= 2) {
    out.batch_p_value = thorough->BatchPValue(scores);
  } else if (calibration != nullptr && scores.size() >= 2) {
    out.batch_p_value = calibration->BatchPValue(scores);
  }
  return out;
}

}  // namespace vdm
