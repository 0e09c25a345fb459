#include "tools/anomaly_scoring.h"

#include <ATen/ATen.h>
#include <torch/script.h>

#include <algorithm>
#include <optional>

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
    std::optional<BpdScores> b;
    if (options.background != nullptr) {
      OnSchedule on_schedule(*options.background, model);
      VDM_ASSIGN_OR_RETURN(b, ScoreImages(on_schedule, part, score));
    }
    // The server's per-image records (image_scores.h), plus the features.
    VDM_ASSIGN_OR_RETURN(std::vector<ImageBpd> records,
                         ImageScoresOf(s, ToImages(part), options.pixel_map,
                                       b ? &*b : nullptr));
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

}  // namespace vdm
