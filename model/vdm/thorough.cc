#include "model/vdm/thorough.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "model/vdm/status_macros.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double SafeLog(double v) { return std::log(std::max(v, 1e-12)); }

}  // namespace

double LogUpperTail(double z) {
  if (std::isnan(z)) return kNaN;
  // erfc is exact to z of about 37 (then it underflows); from 30 the
  // asymptotic series of Mills' ratio is within 15 / z^6 (2e-8) of it.
  if (z < 30.0) return std::log(0.5 * std::erfc(z / std::sqrt(2.0)));
  const double z2 = z * z;
  return -0.5 * z2 - std::log(z) - 0.5 * std::log(2.0 * 3.14159265358979323846) +
         std::log(1.0 - 1.0 / z2 + 3.0 / (z2 * z2));
}

double ChiSquaredZ(double m, double d) {
  if (!(m >= 0) || !(d > 0)) return kNaN;
  const double v = 2.0 / (9.0 * d);
  return (std::cbrt(m / d) - (1.0 - v)) / std::sqrt(v);
}

const char* ThoroughCalibration::GroupName(int g) {
  static const char* const kNames[kGroups] = {"fast", "knn", "recon_error",
                                              "recon_distance"};
  return g >= 0 && g < kGroups ? kNames[g] : "?";
}

double ThoroughCalibration::KnnDistance(
    const std::vector<float>& embedding) const {
  const int64_t d = dimension_, n = reference_size();
  if (static_cast<int64_t>(embedding.size()) != d || n == 0) return kNaN;
  const int k = std::min<int64_t>(setup_.knn_k, n);
  // The k smallest squared distances, kept sorted (k is small).
  std::vector<double> best(k, std::numeric_limits<double>::infinity());
  for (int64_t r = 0; r < n; ++r) {
    const float* row = reference_.data() + r * d;
    double s = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double diff = static_cast<double>(embedding[j]) - row[j];
      s += diff * diff;
    }
    if (s < best.back()) {
      best.back() = s;
      std::sort(best.begin(), best.end());
    }
  }
  double mean = 0;
  for (double s : best) mean += std::sqrt(s) / k;
  return mean;
}

std::vector<std::vector<double>> ThoroughCalibration::GroupFeatures(
    const ImageLikelihood& image, double* knn_distance) const {
  std::vector<std::vector<double>> g(kGroups);
  g[0] = AnomalyFeatures(image.bpd, image.complexity, image.band);
  if (!image.thorough) return g;
  const ThoroughFeatures& t = *image.thorough;
  const double distance = KnnDistance(t.embedding);
  if (knn_distance != nullptr) *knn_distance = distance;
  g[1] = {SafeLog(distance)};
  for (double e : t.recon_error) g[2].push_back(SafeLog(e));
  for (double e : t.recon_distance) g[3].push_back(SafeLog(e));
  return g;
}

std::vector<double> ThoroughCalibration::GroupZ(const ImageLikelihood& image,
                                                double* knn_distance) const {
  const std::vector<std::vector<double>> g = GroupFeatures(image, knn_distance);
  std::vector<double> z(kGroups, kNaN);
  for (int i = 0; i < kGroups && i < static_cast<int>(groups_.size()); ++i) {
    const double m = groups_[i].SquaredDistance(g[i]);  // NaN on a size mismatch
    if (!std::isfinite(m)) continue;
    if (i == 1) {
      // The kNN distance is one-sided: nearer to the training images than
      // usual is typical, not odd. The signed standard score.
      z[i] = (g[i][0] >= groups_[i].mean()[0] ? 1.0 : -1.0) * std::sqrt(m);
    } else {
      z[i] = ChiSquaredZ(m, g[i].size());
    }
  }
  return z;
}

double ThoroughCalibration::Score(const ImageLikelihood& image,
                                 double* knn_distance) const {
  double score = 0;
  for (double z : GroupZ(image, knn_distance)) {
    // A missing or broken feature is as far out as a feature can be: such
    // an image is nothing like the calibration set.
    score += std::isnan(z) ? 1e300 : -2.0 * LogUpperTail(z);
  }
  return score;
}

double ThoroughCalibration::PValue(double score) const {
  return ConformalPValue(sorted_scores_, score);
}

double ThoroughCalibration::BatchPValue(const std::vector<double>& scores) const {
  return BootstrapBatchPValue(sorted_scores_, scores, 2000);
}

absl::StatusOr<ThoroughCalibration> ThoroughCalibration::Fit(
    const std::vector<ImageLikelihood>& images, std::vector<float> reference,
    int64_t dimension, const ThoroughSetup& setup) {
  if (dimension < 1 || reference.empty() ||
      static_cast<int64_t>(reference.size()) % dimension != 0) {
    return absl::InvalidArgumentError(
        "thorough calibration: the reference must be [N, D] with D >= 1");
  }
  if (setup.knn_k < 1 ||
      static_cast<int64_t>(reference.size()) / dimension <= setup.knn_k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "thorough calibration: knn_k must be >= 1 and below the reference "
        "size, got k = ", setup.knn_k));
  }
  ThoroughCalibration c;
  c.setup_ = setup;
  c.reference_ = std::move(reference);
  c.dimension_ = dimension;
  std::vector<std::vector<std::vector<double>>> per_group(kGroups);
  for (const ImageLikelihood& image : images) {
    if (!image.thorough ||
        static_cast<int64_t>(image.thorough->embedding.size()) != dimension ||
        image.thorough->recon_error.size() != setup.times.size() ||
        image.thorough->recon_distance.size() != setup.times.size()) {
      return absl::InvalidArgumentError(
          "thorough calibration: an image lacks its thorough features or "
          "has the wrong number of them");
    }
    std::vector<std::vector<double>> g = c.GroupFeatures(image);
    for (int i = 0; i < kGroups; ++i) per_group[i].push_back(std::move(g[i]));
  }
  for (int i = 0; i < kGroups; ++i) {
    absl::StatusOr<Calibration> fit = Calibration::Fit(per_group[i], setup.elbo);
    if (!fit.ok()) {
      return absl::Status(fit.status().code(),
                          absl::StrCat("thorough calibration, group ",
                                       GroupName(i), ": ", fit.status().message()));
    }
    c.groups_.push_back(*std::move(fit));
  }
  for (const ImageLikelihood& image : images) {
    c.sorted_scores_.push_back(c.Score(image));
  }
  std::sort(c.sorted_scores_.begin(), c.sorted_scores_.end());
  return c;
}

void ThoroughCalibration::ToJsonValue(nlohmann::json* out) const {
  nlohmann::json& j = *out;
  j["model"] =
      "per group a gaussian (full covariance); groups combined by Fisher's "
      "method over Wilson-Hilferty tails; conformal p-values";
  j["probe_times"] = setup_.times;
  j["probe_draws"] = setup_.draws;
  j["probe_seed"] = setup_.probe_seed;
  j["knn_k"] = setup_.knn_k;
  j["feature_model"] = setup_.feature_model;
  j["timesteps"] = setup_.elbo.timesteps;
  j["shared_noise"] = setup_.elbo.shared_noise;
  j["time_proposal"] = setup_.elbo.time_proposal;
  j["seed"] = setup_.elbo.seed;
  j["data"] = setup_.elbo.data;
  std::string bytes(reference_.size() * sizeof(float), '\0');
  std::memcpy(bytes.data(), reference_.data(), bytes.size());
  j["reference"] = {{"rows", reference_size()},
                    {"dimension", dimension_},
                    {"float32_le_base64", absl::Base64Escape(bytes)}};
  for (int i = 0; i < kGroups; ++i) {
    groups_[i].ToJsonValue(&j["groups"][GroupName(i)]);
  }
  j["sorted_scores"] = sorted_scores_;
}

absl::StatusOr<ThoroughCalibration> ThoroughCalibration::FromJsonValue(
    const nlohmann::json& j) {
  const auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(
        absl::StrCat("calibration: anomaly.thorough: ", what));
  };
  if (!j.is_object()) return bad("not a JSON object");
  ThoroughCalibration c;
  std::string bytes;
  try {
    c.setup_.times = j.at("probe_times").get<std::vector<double>>();
    c.setup_.draws = j.at("probe_draws").get<int>();
    c.setup_.probe_seed = j.at("probe_seed").get<uint64_t>();
    c.setup_.knn_k = j.at("knn_k").get<int>();
    c.setup_.feature_model = j.value("feature_model", "");
    c.setup_.elbo.timesteps = j.at("timesteps").get<int>();
    c.setup_.elbo.shared_noise = j.at("shared_noise").get<bool>();
    c.setup_.elbo.time_proposal = j.at("time_proposal").get<bool>();
    c.setup_.elbo.seed = j.at("seed").get<uint64_t>();
    c.setup_.elbo.data = j.value("data", "");
    const nlohmann::json& ref = j.at("reference");
    c.dimension_ = ref.at("dimension").get<int64_t>();
    const int64_t rows = ref.at("rows").get<int64_t>();
    if (!absl::Base64Unescape(ref.at("float32_le_base64").get<std::string>(),
                              &bytes)) {
      return bad("reference: not base64");
    }
    if (c.dimension_ < 1 || rows < 1 ||
        bytes.size() != static_cast<size_t>(rows * c.dimension_) * sizeof(float)) {
      return bad("reference: its size is not rows x dimension float32");
    }
    c.sorted_scores_ = j.at("sorted_scores").get<std::vector<double>>();
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  c.reference_.resize(bytes.size() / sizeof(float));
  std::memcpy(c.reference_.data(), bytes.data(), bytes.size());
  for (float v : c.reference_) {
    if (!std::isfinite(v)) return bad("reference: non-finite values");
  }
  if (c.setup_.times.empty() || c.setup_.draws < 1 || c.setup_.knn_k < 1 ||
      c.setup_.knn_k >= c.reference_size()) {
    return bad("probe_times, probe_draws or knn_k out of range");
  }
  for (double t : c.setup_.times) {
    if (!(t > 0 && t < 1)) return bad("probe_times must be in (0, 1)");
  }
  if (c.sorted_scores_.empty() ||
      !std::is_sorted(c.sorted_scores_.begin(), c.sorted_scores_.end())) {
    return bad("sorted_scores must be non-empty and ascending");
  }
  const size_t dims[kGroups] = {1 + kBands, 1, c.setup_.times.size(),
                                c.setup_.times.size()};
  if (!j.contains("groups") || !j["groups"].is_object()) return bad("no groups");
  for (int i = 0; i < kGroups; ++i) {
    if (!j["groups"].contains(GroupName(i))) {
      return bad(absl::StrCat("no group ", GroupName(i)));
    }
    absl::StatusOr<Calibration> g =
        Calibration::FromJsonValue(j["groups"][GroupName(i)], dims[i]);
    if (!g.ok()) {
      return bad(absl::StrCat("group ", GroupName(i), ": ", g.status().message()));
    }
    c.groups_.push_back(*std::move(g));
  }
  return c;
}

bool ThoroughApplies(const ThoroughCalibration& calibration,
                     const AnomalyRequest& request) {
  const Calibration::Setup& s = calibration.setup().elbo;
  return request.method == ScoreMethod::kElbo &&
         request.level == AnomalyLevel::kThorough &&
         s.timesteps == request.timesteps &&
         s.shared_noise == request.shared_noise &&
         s.time_proposal == request.time_proposal;
}

}  // namespace vdm
