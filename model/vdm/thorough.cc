#include "model/vdm/thorough.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
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
                                              "recon_distance", "local"};
  return g >= 0 && g < kGroups ? kNames[g] : "?";
}

absl::StatusOr<FeatureReference> FeatureReference::Create(
    std::vector<float> embeddings, int64_t dimension, std::vector<uint8_t> images,
    int64_t channels, int64_t height, int64_t width) {
  const auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("feature reference: ", what));
  };
  if (dimension < 1 || embeddings.empty() ||
      static_cast<int64_t>(embeddings.size()) % dimension != 0) {
    return bad("the embeddings must be [N, D] with N, D >= 1");
  }
  for (float v : embeddings) {
    if (!std::isfinite(v)) return bad("non-finite embeddings");
  }
  const int64_t n = static_cast<int64_t>(embeddings.size()) / dimension;
  constexpr int64_t kMaxSide = 1 << 16;  // keeps C H W far from overflowing
  if (channels < 1 || height < 1 || width < 1 || channels > kMaxSide ||
      height > kMaxSide || width > kMaxSide ||
      images.size() % static_cast<size_t>(channels * height * width) != 0 ||
      static_cast<int64_t>(images.size() / static_cast<size_t>(channels * height * width)) != n) {
    return bad(absl::StrCat("the images must be [", n, ", C, H, W] uint8 (one "
                            "per embedding), got ", images.size(), " bytes"));
  }
  FeatureReference r;
  r.embeddings_ = std::move(embeddings);
  r.dimension_ = dimension;
  r.images_ = std::move(images);
  r.channels_ = channels, r.height_ = height, r.width_ = width;
  return r;
}

std::vector<Neighbour> FeatureReference::Nearest(
    const std::vector<float>& embedding, int k) const {
  const int64_t d = dimension_, n = size();
  if (static_cast<int64_t>(embedding.size()) != d || n == 0 || k < 1) return {};
  k = static_cast<int>(std::min<int64_t>(k, n));
  // The k smallest squared distances, kept sorted (k is small).
  std::vector<std::pair<double, int64_t>> best(
      k, {std::numeric_limits<double>::infinity(), -1});
  for (int64_t r = 0; r < n; ++r) {
    const float* row = embeddings_.data() + r * d;
    double s = 0;
    for (int64_t j = 0; j < d; ++j) {
      const double diff = static_cast<double>(embedding[j]) - row[j];
      s += diff * diff;
    }
    if (s < best.back().first) {
      best.back() = {s, r};
      std::sort(best.begin(), best.end());
    }
  }
  std::vector<Neighbour> out;
  for (const auto& [s, r] : best) out.push_back({r, std::sqrt(s)});
  return out;
}

void FeatureReference::ToJsonValue(nlohmann::json* out) const {
  nlohmann::json& j = *out;
  std::string bytes(embeddings_.size() * sizeof(float), '\0');
  std::memcpy(bytes.data(), embeddings_.data(), bytes.size());
  j["rows"] = size();
  j["dimension"] = dimension_;
  j["float32_le_base64"] = absl::Base64Escape(bytes);
  j["images"] = {{"channels", channels_},
                 {"height", height_},
                 {"width", width_},
                 {"uint8_base64",
                  absl::Base64Escape(std::string(images_.begin(), images_.end()))}};
}

absl::StatusOr<FeatureReference> FeatureReference::FromJsonValue(
    const nlohmann::json& j) {
  const auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat("reference: ", what));
  };
  std::string bytes, pixels;
  int64_t dimension = 0, rows = 0, c = 0, h = 0, w = 0;
  try {
    dimension = j.at("dimension").get<int64_t>();
    rows = j.at("rows").get<int64_t>();
    if (!absl::Base64Unescape(j.at("float32_le_base64").get<std::string>(),
                              &bytes)) {
      return bad("not base64");
    }
    if (!j.contains("images")) {
      return bad("no images (a thorough section written before the local "
                 "group: recalibrate with vdm-calibrate)");
    }
    const nlohmann::json& im = j.at("images");
    c = im.at("channels").get<int64_t>();
    h = im.at("height").get<int64_t>();
    w = im.at("width").get<int64_t>();
    if (!absl::Base64Unescape(im.at("uint8_base64").get<std::string>(), &pixels)) {
      return bad("images: not base64");
    }
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  const size_t floats = bytes.size() / sizeof(float);
  if (dimension < 1 || rows < 1 || bytes.size() % sizeof(float) != 0 ||
      floats % static_cast<size_t>(dimension) != 0 ||
      floats / static_cast<size_t>(dimension) != static_cast<size_t>(rows)) {
    return bad("its size is not rows x dimension float32");
  }
  std::vector<float> embeddings(bytes.size() / sizeof(float));
  std::memcpy(embeddings.data(), bytes.data(), bytes.size());
  absl::StatusOr<FeatureReference> r = Create(
      std::move(embeddings), dimension,
      std::vector<uint8_t>(pixels.begin(), pixels.end()), c, h, w);
  if (!r.ok()) return bad(std::string(r.status().message()));
  return r;
}

double ThoroughCalibration::KnnDistance(
    const std::vector<float>& embedding) const {
  const std::vector<Neighbour> near = reference_->Nearest(embedding, setup_.knn_k);
  if (near.empty()) return kNaN;
  double mean = 0;
  for (const Neighbour& n : near) mean += n.distance / near.size();
  return mean;
}

double LocalMapFeature(const std::vector<float>& local_map, int top) {
  if (local_map.empty() || top < 1) return kNaN;
  std::vector<float> cells = local_map;
  const size_t k = std::min<size_t>(top, cells.size());
  std::partial_sort(cells.begin(), cells.begin() + k, cells.end(),
                    std::greater<float>());
  double mean = 0;
  for (size_t i = 0; i < k; ++i) mean += static_cast<double>(cells[i]) / k;
  return SafeLog(mean);
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
  g[4] = {LocalMapFeature(t.local_map, setup_.local_top)};
  return g;
}

std::vector<double> ThoroughCalibration::GroupZ(const ImageLikelihood& image,
                                                double* knn_distance) const {
  const std::vector<std::vector<double>> g = GroupFeatures(image, knn_distance);
  std::vector<double> z(kGroups, kNaN);
  for (int i = 0; i < kGroups && i < static_cast<int>(groups_.size()); ++i) {
    const double m = groups_[i].SquaredDistance(g[i]);  // NaN on a size mismatch
    if (!std::isfinite(m)) continue;
    if (i == 1 || i == 4) {
      // The kNN and local distances are one-sided: nearer to the training
      // images than usual is typical, not odd. The signed standard score.
      z[i] = (g[i][0] >= groups_[i].mean()[0] ? 1.0 : -1.0) * std::sqrt(m);
    } else {
      z[i] = ChiSquaredZ(m, g[i].size());
    }
  }
  return z;
}

double ThoroughCalibration::Score(const ImageLikelihood& image,
                                 double* knn_distance) const {
  const std::vector<double> z = GroupZ(image, knn_distance);
  double score = 0;
  for (int g : combined_) {
    // A missing or broken feature is as far out as a feature can be: such
    // an image is nothing like the calibration set.
    score += std::isnan(z[g]) ? 1e300 : -2.0 * LogUpperTail(z[g]);
  }
  return score;
}

namespace {

// The indices of the named groups: each known, none twice, at least one.
absl::StatusOr<std::vector<int>> CombinedGroups(
    const std::vector<std::string>& names) {
  std::vector<int> out;
  for (const std::string& name : names) {
    int g = 0;
    while (g < ThoroughCalibration::kGroups &&
           name != ThoroughCalibration::GroupName(g)) {
      ++g;
    }
    if (g == ThoroughCalibration::kGroups) {
      return absl::InvalidArgumentError(absl::StrCat(
          "combined_groups: unknown group '", name,
          "' (fast, knn, recon_error, recon_distance, local)"));
    }
    if (std::find(out.begin(), out.end(), g) != out.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("combined_groups: '", name, "' twice"));
    }
    out.push_back(g);
  }
  if (out.empty()) {
    return absl::InvalidArgumentError("combined_groups: none");
  }
  return out;
}

}  // namespace

double ThoroughCalibration::PValue(double score) const {
  return ConformalPValue(sorted_scores_, score);
}

double ThoroughCalibration::BatchPValue(const std::vector<double>& scores) const {
  return BootstrapBatchPValue(sorted_scores_, scores, 2000);
}

absl::StatusOr<ThoroughCalibration> ThoroughCalibration::Fit(
    const std::vector<ImageLikelihood>& images,
    std::shared_ptr<const FeatureReference> reference,
    const ThoroughSetup& setup) {
  if (reference == nullptr) {
    return absl::InvalidArgumentError("thorough calibration: no reference");
  }
  if (setup.local_neighbours < 1 || setup.local_window < 0 || setup.local_top < 1) {
    return absl::InvalidArgumentError(
        "thorough calibration: local_neighbours and local_top must be >= 1, "
        "local_window >= 0");
  }
  const int64_t dimension = reference->dimension();
  if (setup.knn_k < 1 || reference->size() <= setup.knn_k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "thorough calibration: knn_k must be >= 1 and below the reference "
        "size, got k = ", setup.knn_k));
  }
  ThoroughCalibration c;
  c.setup_ = setup;
  c.reference_ = std::move(reference);
  absl::StatusOr<std::vector<int>> combined = CombinedGroups(setup.combined);
  if (!combined.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "thorough calibration: ", combined.status().message()));
  }
  c.combined_ = *std::move(combined);
  std::vector<std::vector<std::vector<double>>> per_group(kGroups);
  for (const ImageLikelihood& image : images) {
    if (!image.thorough ||
        static_cast<int64_t>(image.thorough->embedding.size()) != dimension ||
        image.thorough->recon_error.size() != setup.times.size() ||
        image.thorough->recon_distance.size() != setup.times.size() ||
        image.thorough->local_map.empty()) {
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
      "per group a gaussian (full covariance); a z per group (Wilson-Hilferty "
      "for the profile groups, the signed standard score for knn and local); "
      "Fisher's sum over combined_groups; conformal p-values";
  j["combined_groups"] = setup_.combined;
  j["probe_times"] = setup_.times;
  j["probe_draws"] = setup_.draws;
  j["probe_seed"] = setup_.probe_seed;
  j["knn_k"] = setup_.knn_k;
  j["local_neighbours"] = setup_.local_neighbours;
  j["local_window"] = setup_.local_window;
  j["local_top"] = setup_.local_top;
  j["feature_model"] = setup_.feature_model;
  j["timesteps"] = setup_.elbo.timesteps;
  j["shared_noise"] = setup_.elbo.shared_noise;
  j["time_proposal"] = setup_.elbo.time_proposal;
  j["seed"] = setup_.elbo.seed;
  j["data"] = setup_.elbo.data;
  reference_->ToJsonValue(&j["reference"]);
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
  try {
    c.setup_.times = j.at("probe_times").get<std::vector<double>>();
    c.setup_.draws = j.at("probe_draws").get<int>();
    c.setup_.probe_seed = j.at("probe_seed").get<uint64_t>();
    c.setup_.knn_k = j.at("knn_k").get<int>();
    c.setup_.local_neighbours = j.at("local_neighbours").get<int>();
    c.setup_.local_window = j.at("local_window").get<int>();
    c.setup_.local_top = j.at("local_top").get<int>();
    c.setup_.combined = j.at("combined_groups").get<std::vector<std::string>>();
    c.setup_.feature_model = j.value("feature_model", "");
    c.setup_.elbo.timesteps = j.at("timesteps").get<int>();
    c.setup_.elbo.shared_noise = j.at("shared_noise").get<bool>();
    c.setup_.elbo.time_proposal = j.at("time_proposal").get<bool>();
    c.setup_.elbo.seed = j.at("seed").get<uint64_t>();
    c.setup_.elbo.data = j.value("data", "");
    absl::StatusOr<FeatureReference> ref =
        FeatureReference::FromJsonValue(j.at("reference"));
    if (!ref.ok()) return bad(std::string(ref.status().message()));
    c.reference_ = std::make_shared<const FeatureReference>(*std::move(ref));
    c.sorted_scores_ = j.at("sorted_scores").get<std::vector<double>>();
  } catch (const std::exception& e) {
    return bad(e.what());
  }
  if (c.setup_.times.empty() || c.setup_.draws < 1 || c.setup_.knn_k < 1 ||
      c.setup_.knn_k >= c.reference_size() || c.setup_.local_neighbours < 1 ||
      c.setup_.local_window < 0 || c.setup_.local_top < 1) {
    return bad("probe_times, probe_draws, knn_k or the local_ settings out of range");
  }
  for (double t : c.setup_.times) {
    if (!(t > 0 && t < 1)) return bad("probe_times must be in (0, 1)");
  }
  absl::StatusOr<std::vector<int>> combined = CombinedGroups(c.setup_.combined);
  if (!combined.ok()) return bad(std::string(combined.status().message()));
  c.combined_ = *std::move(combined);
  if (c.sorted_scores_.empty() ||
      !std::is_sorted(c.sorted_scores_.begin(), c.sorted_scores_.end())) {
    return bad("sorted_scores must be non-empty and ascending");
  }
  const size_t dims[kGroups] = {1 + kBands, 1, c.setup_.times.size(),
                                c.setup_.times.size(), 1};
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
