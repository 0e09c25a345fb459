#include "tools/anomaly_scoring.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/script.h>

#include <algorithm>
#include <optional>

#include "model/vdm/anomaly.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/local_match.h"
#include "model/vdm/reconstruction.h"
#include "model/vdm/request.h"
#include "model/vdm/rows.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/tensor_image.h"

namespace vdm {
namespace {

// `network`'s predictions on `schedule`'s noise levels: the background model
// evaluated at the model's gamma, so that both see the same rows.
class OnSchedule : public Denoiser {
 public:
  OnSchedule(Denoiser& network, Denoiser& schedule)
      : network_(network), schedule_(schedule) {}
  ImageShape shape() const override { return network_.shape(); }
  int num_classes() const override { return network_.num_classes(); }
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override {
    return network_.Denoise(z, gamma, label);
  }
  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override {
    return schedule_.Gamma(t);
  }

 private:
  Denoiser& network_;
  Denoiser& schedule_;
};

}  // namespace

absl::StatusOr<std::vector<ScoredImage>> ScoreSet(Denoiser& model,
                                                  const at::Tensor& images,
                                                  const SetScoring& options) {
  const int64_t n = images.size(0);
  std::vector<ScoredImage> out;
  torch::NoGradGuard no_grad;
  for (int64_t begin = 0, c = 0; begin < n; begin += options.chunk, ++c) {
    const int64_t m = std::min(options.chunk, n - begin);
    const at::Tensor part = images.narrow(0, begin, m);
    ScoreOptions score;
    score.likelihood.times = options.timesteps;
    score.likelihood.time_proposal = options.time_proposal;
    score.seed = ChunkSeed(options.seed, c);
    score.batch_rows = 64;
    if (options.label >= 0) {
      score.labels = at::full({m}, options.label, at::kLong);
    }
    VDM_ASSIGN_OR_RETURN(BpdScores s, ScoreImages(model, part, score));
    std::optional<BpdScores> b;
    if (options.background != nullptr) {
      OnSchedule on_schedule(*options.background, model);
      VDM_ASSIGN_OR_RETURN(b, ScoreImages(on_schedule, part, score));
    }
    // The server's per-image records (image_scores.h), plus the features.
    VDM_ASSIGN_OR_RETURN(std::vector<ImageBpd> records,
                         ImageScoresOf(s, ToImages(part), options.pixel_map,
                                       b ? &*b : nullptr));
    if (options.thorough) {
      if (options.feature_model == nullptr || options.reference == nullptr) {
        return absl::InvalidArgumentError(
            "thorough scoring needs a feature model and a reference");
      }
      const at::Tensor labels = at::full(
          {m}, options.label >= 0 ? options.label : model.num_classes(), at::kLong);
      VDM_ASSIGN_OR_RETURN(
          std::unique_ptr<ReconstructionPlan> plan,
          ReconstructionPlan::Create(part, labels, ProbesOf(*options.thorough),
                                     ScheduleOf(model)));
      for (int64_t r = 0; r < plan->rows(); r += 64) {
        const int64_t rows = std::min<int64_t>(64, plan->rows() - r);
        VDM_ASSIGN_OR_RETURN(const Rows in, plan->RowsAt(r, rows));
        VDM_ASSIGN_OR_RETURN(const at::Tensor eps_hat, Evaluate(model, in));
        VDM_RETURN_IF_ERROR(plan->Consume(r, eps_hat));
      }
      VDM_RETURN_IF_ERROR(AddThoroughFeatures(*plan, part,
                                              *options.feature_model, &records));
      VDM_RETURN_IF_ERROR(AddLocalMatch(*options.reference, *options.thorough,
                                        part, *options.feature_model, &records));
    }
    for (ImageBpd& record : records) {
      ScoredImage r;
      static_cast<ImageBpd&>(r) = std::move(record);
      r.features = AnomalyFeatures(r.bpd, r.complexity, r.band);
      out.push_back(std::move(r));
    }
    if (options.progress) options.progress(begin + m, n);
  }
  return out;
}

absl::StatusOr<ProposalFitData> ProposalFitLosses(
    Denoiser& model, const at::Tensor& images, int fit_bins, uint64_t seed,
    int64_t chunk,
    const std::function<void(int64_t done, int64_t total)>& progress) {
  if (fit_bins < 1 || chunk < 1) {
    return absl::InvalidArgumentError("fit_bins and chunk must be >= 1");
  }
  const int64_t n = images.size(0);
  ProposalFitData data;
  data.fit_bins = fit_bins;
  torch::NoGradGuard no_grad;
  LikelihoodOptions options;
  options.times = 2 * fit_bins;
  options.replicates = 2;
  for (int64_t begin = 0, c = 0; begin < n; begin += chunk, ++c) {
    const int64_t m = std::min(chunk, n - begin);
    at::Generator gen =
        at::make_generator<at::CPUGeneratorImpl>(ChunkSeed(seed, c));
    VDM_ASSIGN_OR_RETURN(
        std::unique_ptr<LikelihoodPlan> plan,
        LikelihoodPlan::Create(images.narrow(0, begin, m),
                               at::full({m}, int64_t{model.num_classes()},
                                        at::kLong),
                               options, ScheduleOf(model), gen));
    for (int64_t r = 0; r < plan->rows(); r += 64) {
      const int64_t rows = std::min<int64_t>(64, plan->rows() - r);
      VDM_ASSIGN_OR_RETURN(const Rows in, plan->RowsAt(r, rows));
      VDM_ASSIGN_OR_RETURN(const at::Tensor eps_hat, Evaluate(model, in));
      VDM_RETURN_IF_ERROR(plan->Consume(r, eps_hat));
    }
    // Row k = 2 j + r is replicate r's point in bin j: the fit layout.
    const at::Tensor losses = plan->row_losses().contiguous();
    const at::Tensor control = plan->row_control().contiguous();
    for (int64_t i = 0; i < m; ++i) {
      const double* p = losses[i].data_ptr<double>();
      data.loss.emplace_back(p, p + options.times);
      const double* c = control[i].data_ptr<double>();
      data.control.emplace_back(c, c + options.times);
    }
    if (progress) progress(begin + m, n);
  }
  return data;
}

}  // namespace vdm
