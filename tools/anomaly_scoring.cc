#include "tools/anomaly_scoring.h"

#include <ATen/ATen.h>
#include <torch/script.h>

#include <algorithm>

#include "model/vdm/anomaly.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/request.h"
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
    score.seed = ChunkSeed(options.seed, c);
    score.batch_rows = 64;
    if (options.label >= 0) {
      score.labels = at::full({m}, options.label, at::kLong);
    }
    VDM_ASSIGN_OR_RETURN(BpdScores s, ScoreImages(model, part, score));
    at::Tensor background;
    if (options.background != nullptr) {
      OnSchedule on_schedule(*options.background, model);
      VDM_ASSIGN_OR_RETURN(BpdScores b, ScoreImages(on_schedule, part, score));
      background = b.bpd;
    }
    const std::vector<Image8> pictures = ToImages(part);
    for (int64_t i = 0; i < m; ++i) {
      ScoredImage r;
      r.bpd = s.bpd[i].item<double>();
      VDM_ASSIGN_OR_RETURN(r.complexity, ComplexityBpd(pictures[i]));
      const at::Tensor band = s.band[i].contiguous();
      r.band.assign(band.data_ptr<double>(), band.data_ptr<double>() + band.numel());
      r.features = AnomalyFeatures(r.bpd, r.complexity, r.band);
      if (background.defined()) r.background_bpd = background[i].item<double>();
      out.push_back(std::move(r));
    }
    if (options.progress) options.progress(begin + m, n);
  }
  return out;
}

}  // namespace vdm
