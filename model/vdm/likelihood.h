// Per-image likelihood (docs/design.md, "Scoring"): bits per dimension of the VDM
// variational bound, prior + reconstruction + diffusion, the diffusion term
// estimated at K stratified times per image, with an honest standard error.
//
// The work is split so a continuous-batching engine can interleave it with
// other requests: a LikelihoodPlan draws the times and noise, hands out
// network rows in any chunking (Rows), receives eps_hat for them (Consume),
// and once every row is back returns per-image scores (Result). ScoreImages
// runs a plan synchronously in batches.
#ifndef VDM_MODEL_VDM_LIKELIHOOD_H_
#define VDM_MODEL_VDM_LIKELIHOOD_H_

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/rows.h"
#include "model/vdm/schedule.h"
#include "model/vdm/time_proposal.h"

namespace vdm {

// The K times of an image form G interpenetrating systematic samples: time
// k belongs to replicate r = k mod G at position j = k div G, and replicate
// r (n_r points) places its points at t = (j + u_r) / n_r with its own
// uniform offset u_r. Each replicate is an unbiased estimate of the diffusion
// integral; the score averages the G replicate means, and the spread of the
// replicate means gives an unbiased variance estimate with G - 1 degrees of
// freedom. (A single systematic sample t_k = (k + u) / K is slightly more
// precise but has no honest variance estimate: adjacent-strata differences
// overstate it about 4x at K = 16 when the loss varies strongly with t, see
// docs/oracle.md.)
struct LikelihoodOptions {
  // K >= 1 times per image; K >= 2 for a standard error (NaN with K = 1).
  int times = 16;
  // G random starts, 1 <= G <= K (G = 1: no standard error); 0 = automatic:
  // max(2, K / 16) (at least 16 points per replicate, where systematic
  // sampling resolves the loss curve; more replicates add degrees of freedom
  // to the standard error).
  int replicates = 0;
  // true: common random numbers, the same offsets, eps and eps0 for every
  // image (identical images get identical scores; use it to rank images).
  // false: an independent draw per image (use it for dataset means: with
  // shared offsets and small K every image shares the same error).
  bool shared_noise = false;
  // 0: the continuous-time diffusion loss 0.5 gamma'(t) ||eps - eps_hat||^2.
  // T > 0: the discrete-time VLB with T steps at t = i / T, s = (i - 1) / T,
  // i = ceil(t T) (uniform over 1..T for uniform t).
  int discrete_steps = 0;
  // Importance-sampled times (time_proposal.h): the layout above is laid
  // out in u and each time is t = F^{-1}(u), F the proposal's CDF, and each
  // row's loss is weighted by 1 / q(t). Every replicate stays an unbiased
  // estimate, so the standard error stays honest. Null = uniform times.
  // With the proposal's control variate (TimeProposal::Control), each row's
  // loss is L - beta(t) 0.5 gamma'(t) (||eps||^2 - D), unbiased for any
  // beta. Continuous time only (discrete_steps = 0).
  std::shared_ptr<const TimeProposal> time_proposal;
};

// The number of replicates G used for `options` (resolves 0 = automatic).
int ReplicatesFor(const LikelihoodOptions& options);

// Times [n, K] float64 for offsets u [n, G] in [0, 1) (layout above).
at::Tensor ReplicatedTimes(int times, const at::Tensor& u);

// The estimate of the diffusion integral from per-time losses [n, K]
// (float64) laid out as above with G replicates: its mean [n] and the
// unbiased variance of that mean [n] (NaN when G < 2).
struct ReplicatedEstimate {
  at::Tensor mean;
  at::Tensor variance;
};
ReplicatedEstimate EstimateFromReplicates(const at::Tensor& losses,
                                          int replicates);

// Per-image results in bits per dimension, [n] float64 each. stderr_bpd is
// the standard error of the diffusion term's K-time estimate.
struct BpdScores {
  at::Tensor bpd;
  at::Tensor prior;
  at::Tensor recon;
  at::Tensor diffusion;
  at::Tensor stderr_bpd;
  // [n, kBands] (anomaly.h): the diffusion term by band of t, [b/B,
  // (b+1)/B); each row sums to `diffusion`.
  at::Tensor band;
  // [n, H, W]: the diffusion term per pixel in bits (summed over channels,
  // averaged over the K times): where the model finds the image unlikely.
  at::Tensor pixel_bits;
};

// The band profile [n, bands] in the units of `losses` [n, K], from the
// rows' times [n, K]: row k adds weights[k] losses[k] to the band of its
// time; weights is [K] (the same for every image) or [n, K]. With the
// estimator's weights (RowWeights, times the importance weights with a
// time proposal) the bands sum to its estimate.
at::Tensor BandProfile(const at::Tensor& losses, const at::Tensor& times,
                       int bands, const at::Tensor& weights);

// The weight [K] float64 of each of the K rows of an image in the
// replicated estimate: 1 / (G n_r) for a row of replicate r with n_r points
// (1 / K when the replicates are of equal size); they sum to 1.
at::Tensor RowWeights(int times, int replicates);

// The likelihood of n images. Not thread-safe (one caller at a time); all
// tensors live on the CPU. As a RowPlan it is one evaluation of all its
// rows (Next() = RowsAt(0, rows())); RowsAt and Consume(begin, ...) give
// any chunking directly.
class LikelihoodPlan : public RowPlan {
 public:
  // x_uint8 [n, C, H, W] (any integer dtype, values 0..255); labels [n]
  // int64, the label each image's rows carry (num_classes = "no label"), or
  // undefined (rows without labels: Evaluate gives them "no label"). Draws, from
  // `gen` in this order: the offsets u [n or 1, G], the noise eps of every
  // row, the
  // reconstruction noise eps0; evaluates `schedule` once at the rows' times
  // (and their predecessors s for discrete time) and once at t = {0, 1}.
  static absl::StatusOr<std::unique_ptr<LikelihoodPlan>> Create(
      const at::Tensor& x_uint8, const at::Tensor& labels,
      const LikelihoodOptions& options, const ScheduleFn& schedule,
      at::Generator gen);

  int64_t num_images() const { return x_.size(0); }
  int times() const { return options_.times; }
  int64_t rows() const { return num_images() * options_.times; }
  // Rows [begin, begin + count) (0 <= begin, begin + count <= rows()).
  // Row r = i * K + k is image i at its k-th time.
  absl::StatusOr<vdm::Rows> RowsAt(int64_t begin, int64_t count) const;
  // eps_hat [m, C, H, W] (any float dtype, any device) for rows [begin,
  // begin + m). Each row must be given exactly once.
  absl::Status Consume(int64_t begin, const at::Tensor& eps_hat);
  int64_t received() const { return received_; }
  bool complete() const { return received_ == rows(); }
  // RowPlan.
  int64_t rows_per_evaluation() const override { return rows(); }
  Rows Next() override;
  absl::Status Consume(const Evaluation& out) override {
    return Consume(0, out.eps);
  }
  bool done() const override { return complete(); }
  // The scores once complete().
  absl::StatusOr<BpdScores> Result() const;
  // Per-row diffusion losses in nats [n, K] (valid once complete(); with a
  // control variate, the controlled loss), the rows' times t [n, K] and
  // their importance weights 1 / q(t) [n, K] (all 1 with uniform times):
  // the estimate averages losses x weights. row_control() is each row's
  // 0.5 gamma'(t) (||eps||^2 - D) [n, K] (continuous time), which the
  // losses already carry times beta(t) when the proposal has a control
  // variate.
  at::Tensor row_losses() const { return losses_.reshape({num_images(), -1}); }
  at::Tensor row_times() const { return t_.reshape({num_images(), -1}); }
  at::Tensor row_importance() const {
    return importance_.reshape({num_images(), -1});
  }
  at::Tensor row_control() const { return control_.reshape({num_images(), -1}); }

 private:
  LikelihoodPlan(at::Tensor x, const LikelihoodOptions& options)
      : x_(std::move(x)), options_(options) {}
  absl::Status Draw(const ScheduleFn& schedule, at::Generator& gen);
  // Writes the diffusion losses of rows [begin, begin + m) (may throw).
  void LossesFor(int64_t begin, const at::Tensor& eps_hat);

  const at::Tensor x_;  // [n, C, H, W] uint8
  at::Tensor labels_;   // [n] int64 or undefined
  const LikelihoodOptions options_;
  at::Tensor f_;              // [n, C, H, W] float32 model space
  at::Tensor gamma_;          // [n K] float64 gamma at the rows' t
  at::Tensor dgamma_;         // [n K] float64 gamma'(t) (continuous)
  at::Tensor gamma_s_;        // [n K] float64 gamma(t - 1/T) (discrete)
  at::Tensor eps_;            // [n K, C, H, W] float32
  at::Tensor prior_, recon_;  // [n] float64 nats
  at::Tensor losses_;         // [n K] float64 nats
  at::Tensor t_;              // [n K] float64 times
  at::Tensor importance_;     // [n K] float64 1 / q(t), 1 if uniform
  at::Tensor control_;        // [n K] float64 0.5 gamma' (||eps||^2 - D)
  at::Tensor beta_;           // [n K] float64 its coefficient (0: none)
  at::Tensor pixel_;          // [n, C, H, W] float64 nats, summed over rows
  std::vector<bool> got_;     // rows received
  int64_t received_ = 0;
};

struct ScoreOptions {
  LikelihoodOptions likelihood;
  uint64_t seed = 0;         // same seed and images => same scores
  int64_t batch_rows = 256;  // network rows per forward pass
  // Per-image labels [n] int64; undefined = "no label" (num_classes).
  at::Tensor labels;
  const std::atomic<bool>* stop = nullptr;  // set => Cancelled between batches
};

// Scores images x_uint8 [n, C, H, W] with `model`, synchronously.
absl::StatusOr<BpdScores> ScoreImages(Denoiser& model,
                                      const at::Tensor& x_uint8,
                                      const ScoreOptions& options);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_LIKELIHOOD_H_
