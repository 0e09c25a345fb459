// Importance sampling of the diffusion time for the ELBO's diffusion term
// (docs/performance.md, "Importance-sampled times"), free of torch.
//
// The diffusion term is an integral over t in [0, 1] of the loss L(t) =
// 0.5 gamma'(t) ||eps - eps_hat||^2. Uniform times spend as many network
// evaluations where L is flat and small as where it varies most. A proposal
// density q on [0, 1] puts the evaluations where the variance is, and each
// row's loss is weighted by 1 / q(t), so that every estimate stays
// unbiased for any q > 0: E_q[L(t) / q(t)] = int L(t) dt. LikelihoodPlan
// keeps its replicated-systematic layout in u = F(t) (F the CDF of q) and
// maps each point through F^{-1}, so each replicate is still an unbiased
// estimate and the replicate spread still an honest standard error.
//
// q is piecewise constant on B equal bins of [0, 1]: its CDF is piecewise
// linear, F^{-1} exact and cheap, and a fitted q is a short list of numbers
// stored in the calibration file (calibration_file.h). FitTimeProposal
// chooses it for a fixed model from losses of held-out training images
// (vdm-calibrate); it is mixed with a uniform floor so that no weight
// exceeds 1 / floor, which bounds the damage on an image unlike the ones
// it was fitted on.
//
// With it may come a control variate for the noise of a row's loss at its
// time: c(t) = 0.5 gamma'(t) (||eps||^2 - D), whose expectation is 0 at every
// t (eps ~ N(0, I) in D dimensions, drawn independently of t). A row's loss
// becomes L - beta(t) c(t), unbiased for any beta; beta per bin is the
// regression coefficient of L on c fitted on the same training images. On
// the shipped model L and c correlate by up to 0.77 at low noise, where
// importance sampling alone cannot reach the noise (docs/performance.md).
//
// Thread-safe: a TimeProposal is immutable; the functions are pure.
#ifndef VDM_MODEL_VDM_TIME_PROPOSAL_H_
#define VDM_MODEL_VDM_TIME_PROPOSAL_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json_fwd.hpp"

namespace vdm {

// What the proposal was fitted on and how (free text and numbers kept in
// the file for whoever reads it; the estimator reads only the density).
struct TimeProposalProvenance {
  std::string data;       // e.g. "train images 59500..59755 (held-out)"
  std::string target;     // the shape fitted, e.g. "sqrt(E[L^2])"
  double floor = 0;       // the uniform mixture weight
  uint64_t seed = 0;      // of the fit's rows
  int fit_rows_per_image = 0;
  // The fit's own prediction of the K = 16 variance against uniform
  // times, on its held-out fold (FitTimeProposal); 0 = not recorded.
  double predicted_variance_ratio = 0;
};

class TimeProposal {
 public:
  using Provenance = TimeProposalProvenance;

  // Uniform times (one bin); the estimator's weights are then all 1.
  TimeProposal() : density_{1.0}, cdf_{0.0, 1.0} {}

  // density: one value per equal bin of [0, 1], B >= 1, each finite and
  // > 0; rescaled to integrate to 1 (mean 1 over the bins).
  // control: empty (no control variate) or one coefficient beta per bin,
  // each finite.
  static absl::StatusOr<TimeProposal> FromBins(std::vector<double> density,
                                               Provenance provenance = {},
                                               std::vector<double> control = {});
  // The "time_proposal" section of a calibration file; errors name the
  // field that is wrong.
  static absl::StatusOr<TimeProposal> FromJsonValue(const nlohmann::json& j);
  void ToJsonValue(nlohmann::json* j) const;

  int bins() const { return static_cast<int>(density_.size()); }
  const std::vector<double>& density() const { return density_; }
  const Provenance& provenance() const { return provenance_; }
  // q(t), t clamped to [0, 1] (t = 1 is in the last bin).
  double Density(double t) const;
  // F^{-1}(u) for u in [0, 1]: the t with P_q(T < t) = u.
  double InverseCdf(double u) const;
  // The largest importance weight 1 / q(t).
  double MaxWeight() const;
  // The control variate's coefficient beta(t) (0 without one).
  bool has_control() const { return !control_.empty(); }
  const std::vector<double>& control() const { return control_; }
  double Control(double t) const;

 private:
  std::vector<double> density_;
  std::vector<double> cdf_;  // B + 1 edges, cdf_[0] = 0, cdf_[B] = 1
  std::vector<double> control_;  // B or none
  Provenance provenance_;
};

// The data a proposal is fitted on: for each of n images, the losses at
// two independent (t, eps) draws in each of F equal bins of [0, 1] (both
// replicates of LikelihoodPlan with K = 2F, G = 2 put one point in every
// bin), in any unit. loss[i][2 b + c] is image i's draw c in bin b.
struct ProposalFitData {
  int fit_bins = 0;                       // F
  std::vector<std::vector<double>> loss;  // n x 2F
  // The control variate c of the same rows (n x 2F), or empty: no control
  // variate is fitted.
  std::vector<std::vector<double>> control;
};

struct ProposalFitOptions {
  // The estimator the proposal is chosen for: K times in G replicates.
  int times = 16;
  int replicates = 2;
  // The candidates: bin counts B (each dividing F), uniform floors (each
  // in [min_floor, 1)), and the shapes (below). The one with the lowest
  // predicted variance on held-out folds wins.
  std::vector<int> bins = {16, 32, 64};
  std::vector<double> floors = {0.05, 0.1, 0.2, 0.35, 0.5};
  // No floor below this is considered, whatever the training data says:
  // it caps every weight at 1 / min_floor (20) for images unlike them.
  double min_floor = 0.05;
  int folds = 2;
};

// The fitted proposal and what the fit measured (FitTimeProposal).
struct ProposalFit {
  TimeProposal proposal;
  // Predicted mean per-image variance of the K-time estimate, averaged over
  // the held-out folds, with the chosen proposal and with uniform times.
  double predicted_variance = 0, uniform_variance = 0;
  // One line per candidate: shape, B, floor, predicted variance ratio.
  std::vector<std::string> candidates;
};

// The predicted variance of the replicated-systematic estimate of one
// image's diffusion integral under q, from that image's fit losses (two
// draws per fit bin): with m_b, v_b the mean and variance of the two draws
// of bin b and h(u) = m(t(u)) / q(t(u)), the systematic part Var_U of a
// replicate's mean of h at n points, plus the noise part (1 / n) int v / (2
// q) dt (the other half of the noise already moves m_b, and with it the
// systematic part), divided by G. Exact for a loss that is a step function
// on the fit bins; used to rank proposals, not to report errors.
double PredictedVariance(const std::vector<double>& loss, int fit_bins,
                         const TimeProposal& q, int times, int replicates);

// Chooses B, the floor and the shape: q proportional to sqrt(E_x[L^2])
// (the variance-optimal proposal for independent times), to sqrt(E_x[v])
// (the noise part's optimum) or to E_x[m] (which flattens h, the
// systematic part's optimum), averaged over each fit bin, merged to B
// bins, normalized and mixed with the floor, each candidate fitted on all
// folds but one and scored by PredictedVariance on the one left out.
// The winner is refitted on all images. Needs at least 2 images per fold.
// With data.control, every candidate first fits beta per bin (on the same
// images as its shape) and is judged on the losses L - beta c.
absl::StatusOr<ProposalFit> FitTimeProposal(const ProposalFitData& data,
                                            const ProposalFitOptions& options,
                                            TimeProposal::Provenance provenance);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_TIME_PROPOSAL_H_
