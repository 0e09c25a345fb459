#include "model/vdm/time_proposal.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

// U points over [0, 1) at which the systematic part's variance over the
// replicate's random offset is evaluated (midpoints): fine enough that the
// breakpoints of a step function on 64 bins are resolved to a few percent.
constexpr int kOffsetGrid = 256;

// The candidate's target per fit bin, merged to `bins` bins (averages),
// normalized to mean 1 and mixed with `floor`.
absl::StatusOr<TimeProposal> Shape(const std::vector<double>& target,
                                   int bins, double floor,
                                   TimeProposal::Provenance provenance,
                                   std::vector<double> control) {
  const int f = static_cast<int>(target.size());
  std::vector<double> merged(bins, 0.0);
  for (int b = 0; b < f; ++b) merged[b * bins / f] += target[b] * bins / f;
  double mean = 0;
  for (double v : merged) mean += v / bins;
  for (double& v : merged) {
    v = mean > 0 ? (1 - floor) * v / mean + floor : 1.0;
  }
  provenance.floor = floor;
  return TimeProposal::FromBins(std::move(merged), std::move(provenance),
                                std::move(control));
}

// The control variate's coefficient per bin of `bins`, by least squares on
// the differences of each image's two draws in a fit bin (which removes the
// image's own level): empty without control data.
std::vector<double> ControlCoefficients(const ProposalFitData& d,
                                        const std::vector<int>& rows,
                                        int bins) {
  if (d.control.empty()) return {};
  const int f = d.fit_bins;
  std::vector<double> num(bins, 0.0), den(bins, 0.0);
  for (int i : rows) {
    for (int b = 0; b < f; ++b) {
      const double dl = d.loss[i][2 * b] - d.loss[i][2 * b + 1];
      const double dc = d.control[i][2 * b] - d.control[i][2 * b + 1];
      num[b * bins / f] += dl * dc;
      den[b * bins / f] += dc * dc;
    }
  }
  std::vector<double> beta(bins);
  for (int b = 0; b < bins; ++b) beta[b] = den[b] > 0 ? num[b] / den[b] : 0.0;
  return beta;
}

// The losses L - beta c (the data as it is when beta is empty).
ProposalFitData Controlled(const ProposalFitData& d,
                           const std::vector<double>& beta) {
  ProposalFitData out;
  out.fit_bins = d.fit_bins;
  out.loss = d.loss;
  if (beta.empty()) return out;
  const int f = d.fit_bins, bins = static_cast<int>(beta.size());
  for (size_t i = 0; i < d.loss.size(); ++i) {
    for (int k = 0; k < 2 * f; ++k) {
      out.loss[i][k] -= beta[(k / 2) * bins / f] * d.control[i][k];
    }
  }
  return out;
}

// The three shapes' targets per fit bin from the images `rows` of `data`.
struct Targets {
  std::vector<double> sqrt_l2, sqrt_v, mean;
};

Targets TargetsOf(const ProposalFitData& data, const std::vector<int>& rows) {
  const int f = data.fit_bins;
  Targets t{std::vector<double>(f, 0.0), std::vector<double>(f, 0.0),
            std::vector<double>(f, 0.0)};
  for (int i : rows) {
    const std::vector<double>& l = data.loss[i];
    for (int b = 0; b < f; ++b) {
      const double a = l[2 * b], c = l[2 * b + 1];
      t.sqrt_l2[b] += 0.5 * (a * a + c * c);
      t.sqrt_v[b] += 0.5 * (a - c) * (a - c);
      t.mean[b] += 0.5 * (a + c);
    }
  }
  for (int b = 0; b < f; ++b) {
    t.sqrt_l2[b] = std::sqrt(t.sqrt_l2[b] / rows.size());
    t.sqrt_v[b] = std::sqrt(t.sqrt_v[b] / rows.size());
    t.mean[b] = std::max(0.0, t.mean[b] / rows.size());
  }
  return t;
}

double MeanPredicted(const ProposalFitData& data, const std::vector<int>& rows,
                     const TimeProposal& q, const ProposalFitOptions& o) {
  double sum = 0;
  for (int i : rows) {
    sum += PredictedVariance(data.loss[i], data.fit_bins, q, o.times,
                             o.replicates);
  }
  return sum / rows.size();
}

}  // namespace

absl::StatusOr<TimeProposal> TimeProposal::FromBins(std::vector<double> density,
                                                    Provenance provenance,
                                                    std::vector<double> control) {
  if (density.empty()) {
    return absl::InvalidArgumentError("time proposal: no bins");
  }
  double total = 0;
  for (size_t b = 0; b < density.size(); ++b) {
    if (!std::isfinite(density[b]) || !(density[b] > 0)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "time proposal: density of bin ", b, " is ", density[b],
          "; every bin needs a finite density > 0 (an importance weight is "
          "1 / density)"));
    }
    total += density[b];
  }
  if (!control.empty() && control.size() != density.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "time proposal: ", control.size(), " control coefficients for ",
        density.size(), " bins"));
  }
  for (size_t b = 0; b < control.size(); ++b) {
    if (!std::isfinite(control[b])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "time proposal: control coefficient of bin ", b, " is not finite"));
    }
  }
  TimeProposal q;
  q.control_ = std::move(control);
  const double bins = static_cast<double>(density.size());
  q.cdf_.assign(1, 0.0);
  for (double& d : density) {
    d *= bins / total;
    q.cdf_.push_back(q.cdf_.back() + d / bins);
  }
  q.cdf_.back() = 1.0;
  q.density_ = std::move(density);
  q.provenance_ = std::move(provenance);
  return q;
}

double TimeProposal::Density(double t) const {
  const int b = std::clamp(static_cast<int>(std::floor(t * bins())), 0,
                           bins() - 1);
  return density_[b];
}

double TimeProposal::Control(double t) const {
  if (control_.empty()) return 0;
  const int b = std::clamp(static_cast<int>(std::floor(t * bins())), 0,
                           bins() - 1);
  return control_[b];
}

double TimeProposal::InverseCdf(double u) const {
  u = std::clamp(u, 0.0, 1.0);
  // The bin whose CDF interval holds u, then linear inside it.
  const int b = std::clamp(
      static_cast<int>(std::upper_bound(cdf_.begin(), cdf_.end(), u) -
                       cdf_.begin()) - 1,
      0, bins() - 1);
  const double t = (b + (u - cdf_[b]) * bins() / density_[b]) / bins();
  return std::clamp(t, 0.0, 1.0);
}

double TimeProposal::MaxWeight() const {
  return 1.0 / *std::min_element(density_.begin(), density_.end());
}

void TimeProposal::ToJsonValue(nlohmann::json* j) const {
  nlohmann::json& out = *j;
  out["kind"] = "piecewise constant on equal bins of t";
  out["bins"] = bins();
  out["density"] = density_;
  out["data"] = provenance_.data;
  out["target"] = provenance_.target;
  out["floor"] = provenance_.floor;
  out["seed"] = provenance_.seed;
  out["fit_rows_per_image"] = provenance_.fit_rows_per_image;
  out["predicted_variance_ratio"] = provenance_.predicted_variance_ratio;
  if (!control_.empty()) {
    out["control_variate"] = {
        {"kind", "0.5 gamma'(t) (||eps||^2 - D), per bin of t"},
        {"coefficient", control_}};
  }
}

absl::StatusOr<TimeProposal> TimeProposal::FromJsonValue(const nlohmann::json& j) {
  if (!j.is_object()) {
    return absl::InvalidArgumentError("time_proposal: not a JSON object");
  }
  std::vector<double> density, control;
  Provenance p;
  try {
    density = j.at("density").get<std::vector<double>>();
    if (j.at("bins").get<int>() != static_cast<int>(density.size())) {
      return absl::InvalidArgumentError(absl::StrCat(
          "time_proposal: bins is ", j.at("bins").dump(), " but density has ",
          density.size(), " values"));
    }
    p.data = j.value("data", "");
    p.target = j.value("target", "");
    p.floor = j.value("floor", 0.0);
    p.seed = j.value("seed", uint64_t{0});
    p.fit_rows_per_image = j.value("fit_rows_per_image", 0);
    p.predicted_variance_ratio = j.value("predicted_variance_ratio", 0.0);
    if (j.contains("control_variate")) {
      control = j.at("control_variate").at("coefficient").get<std::vector<double>>();
    }
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("time_proposal: ", e.what()));
  }
  absl::StatusOr<TimeProposal> q =
      FromBins(std::move(density), std::move(p), std::move(control));
  if (!q.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "time_proposal: ", q.status().message()));
  }
  return q;
}

double PredictedVariance(const std::vector<double>& loss, int fit_bins,
                         const TimeProposal& q, int times, int replicates) {
  const int f = fit_bins;
  const int n = std::max(1, times / replicates);
  std::vector<double> m(f), v(f);
  for (int b = 0; b < f; ++b) {
    const double a = loss[2 * b], c = loss[2 * b + 1];
    m[b] = 0.5 * (a + c);
    v[b] = 0.5 * (a - c) * (a - c);
  }
  // Noise part: (1 / n) int v / (2 q) dt, q constant on each fit bin when
  // B divides F (else at the fit bin's centre).
  double noise = 0;
  for (int b = 0; b < f; ++b) {
    noise += v[b] / (2 * q.Density((b + 0.5) / f)) / f;
  }
  noise /= n;
  // Systematic part: the replicate's mean of h at (j + U) / n over U.
  double s1 = 0, s2 = 0;
  for (int k = 0; k < kOffsetGrid; ++k) {
    const double u = (k + 0.5) / kOffsetGrid;
    double mean = 0;
    for (int j = 0; j < n; ++j) {
      const double t = q.InverseCdf((j + u) / n);
      const int b = std::clamp(static_cast<int>(t * f), 0, f - 1);
      mean += m[b] / q.Density(t) / n;
    }
    s1 += mean / kOffsetGrid;
    s2 += mean * mean / kOffsetGrid;
  }
  const double systematic = std::max(0.0, s2 - s1 * s1);
  return (systematic + noise) / replicates;
}

absl::StatusOr<ProposalFit> FitTimeProposal(const ProposalFitData& data,
                                            const ProposalFitOptions& o,
                                            TimeProposal::Provenance provenance) {
  const int f = data.fit_bins;
  const int n = static_cast<int>(data.loss.size());
  if (f < 1 || o.folds < 2 || n < 2 * o.folds) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "time proposal fit: needs fit_bins >= 1 and at least 2 images per "
        "fold (%d images, %d folds)", n, o.folds));
  }
  if (!data.control.empty() && data.control.size() != data.loss.size()) {
    return absl::InvalidArgumentError(
        "time proposal fit: control data for another number of images");
  }
  for (size_t i = 0; i < data.control.size(); ++i) {
    if (data.control[i].size() != data.loss[i].size()) {
      return absl::InvalidArgumentError(
          "time proposal fit: control data of another size than the losses");
    }
  }
  for (const auto& l : data.loss) {
    if (static_cast<int>(l.size()) != 2 * f) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "time proposal fit: an image has %d losses, not 2 x %d fit bins",
          l.size(), f));
    }
    for (double v : l) {
      if (!std::isfinite(v)) {
        return absl::InvalidArgumentError(
            "time proposal fit: a loss is not finite");
      }
    }
  }
  for (int b : o.bins) {
    if (b < 1 || f % b != 0) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "time proposal fit: %d bins do not divide the %d fit bins", b, f));
    }
  }
  for (double fl : o.floors) {
    if (!(fl >= o.min_floor && fl < 1)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "time proposal fit: floor %g is outside [%g, 1)", fl, o.min_floor));
    }
  }
  // Fold k holds images i with i mod folds == k.
  std::vector<std::vector<int>> fit(o.folds), held(o.folds);
  std::vector<int> all;
  for (int i = 0; i < n; ++i) {
    all.push_back(i);
    for (int k = 0; k < o.folds; ++k) (i % o.folds == k ? held : fit)[k].push_back(i);
  }
  const std::vector<std::string> names = {"sqrt(E[L^2])", "sqrt(E[Var L])",
                                          "E[L]"};
  auto target_of = [&](const Targets& t, int shape) -> const std::vector<double>& {
    return shape == 0 ? t.sqrt_l2 : shape == 1 ? t.sqrt_v : t.mean;
  };
  const absl::StatusOr<TimeProposal> uniform =
      TimeProposal::FromBins(std::vector<double>(1, 1.0));
  ProposalFit out{*uniform, 0, 0, {}};
  for (int k = 0; k < o.folds; ++k) {
    out.uniform_variance += MeanPredicted(data, held[k], *uniform, o) / o.folds;
  }
  double best = -1;
  int best_shape = 0, best_bins = 0;
  double best_floor = 0;
  for (int bins : o.bins) {
    // Per fold: beta and the shapes' targets from the fit images, and the
    // controlled losses the held-out images are judged on.
    std::vector<std::vector<double>> beta(o.folds);
    std::vector<ProposalFitData> controlled(o.folds);
    std::vector<Targets> targets;
    for (int k = 0; k < o.folds; ++k) {
      beta[k] = ControlCoefficients(data, fit[k], bins);
      controlled[k] = Controlled(data, beta[k]);
      targets.push_back(TargetsOf(controlled[k], fit[k]));
    }
    for (int shape = 0; shape < 3; ++shape) {
      for (double fl : o.floors) {
        double predicted = 0;
        for (int k = 0; k < o.folds; ++k) {
          absl::StatusOr<TimeProposal> q =
              Shape(target_of(targets[k], shape), bins, fl, {}, beta[k]);
          if (!q.ok()) return q.status();
          predicted += MeanPredicted(controlled[k], held[k], *q, o) / o.folds;
        }
        out.candidates.push_back(absl::StrFormat(
            "%s B=%d floor=%.2f%s: predicted variance ratio %.3f", names[shape],
            bins, fl, data.control.empty() ? "" : " +control",
            predicted / out.uniform_variance));
        if (best < 0 || predicted < best) {
          best = predicted;
          best_shape = shape;
          best_bins = bins;
          best_floor = fl;
        }
      }
    }
  }
  out.predicted_variance = best;
  provenance.target = names[best_shape];
  provenance.predicted_variance_ratio = best / out.uniform_variance;
  std::vector<double> beta = ControlCoefficients(data, all, best_bins);
  absl::StatusOr<TimeProposal> q =
      Shape(target_of(TargetsOf(Controlled(data, beta), all), best_shape),
            best_bins, best_floor, std::move(provenance), beta);
  if (!q.ok()) return q.status();
  out.proposal = *std::move(q);
  return out;
}

}  // namespace vdm
