#include "model/vdm/image_scores.h"

#include <ATen/ATen.h>

#include <cmath>

#include "model/vdm/likelihood.h"
#include "model/vdm/ode_likelihood.h"
#include "model/vdm/status_macros.h"

namespace vdm {

absl::StatusOr<std::vector<ImageBpd>> ImageScoresOf(
    const BpdScores& s, const std::vector<Image8>& images, bool pixel_map,
    const BpdScores* background) {
  const int64_t n = s.bpd.size(0);
  if (static_cast<int64_t>(images.size()) != n) {
    return absl::InvalidArgumentError("one image per score");
  }
  std::vector<ImageBpd> out;
  for (int64_t i = 0; i < n; ++i) {
    ImageBpd b;
    b.bpd = s.bpd[i].item<double>();
    b.prior = s.prior[i].item<double>();
    b.recon = s.recon[i].item<double>();
    b.diffusion = s.diffusion[i].item<double>();
    b.stderr_bpd = s.stderr_bpd[i].item<double>();
    const at::Tensor band = s.band[i].to(at::kDouble).contiguous();
    b.band.assign(band.data_ptr<double>(),
                  band.data_ptr<double>() + band.numel());
    VDM_ASSIGN_OR_RETURN(b.complexity, ComplexityBpd(images[i]));
    if (background != nullptr) {
      b.background_bpd = background->bpd[i].item<double>();
    }
    if (pixel_map) {
      const at::Tensor map = s.pixel_bits[i].to(at::kFloat).contiguous();
      b.pixel_bits.assign(map.data_ptr<float>(),
                          map.data_ptr<float>() + map.numel());
    }
    out.push_back(std::move(b));
  }
  return out;
}

std::vector<ImageBpd> ImageScoresOf(const OdeScores& s) {
  std::vector<ImageBpd> out;
  for (int64_t i = 0; i < s.bpd.size(0); ++i) {
    ImageBpd b;
    b.bpd = s.bpd[i].item<double>();
    b.ode_function_evaluations = s.evaluations[i].item<int64_t>();
    const double se = s.stderr_bpd[i].item<double>();
    if (!std::isnan(se)) b.ode_stderr_bpd = se;
    const double error = s.solver_error_bpd[i].item<double>();
    if (!std::isnan(error)) b.ode_error_bpd = error;
    out.push_back(std::move(b));
  }
  return out;
}

}  // namespace vdm
