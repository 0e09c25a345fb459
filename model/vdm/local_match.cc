#include "model/vdm/local_match.h"

#include <ATen/ATen.h>
#include <torch/script.h>

#include <algorithm>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// Per cell of `q` [C, h, w], the distance to the nearest cell within
// `window` of the same place in any of `r` [k, C, h, w].
at::Tensor NearestCells(const at::Tensor& q, const at::Tensor& r, int window) {
  const int64_t h = q.size(1), w = q.size(2);
  // Padding far away: a cell off the grid is never the nearest.
  const at::Tensor padded = at::constant_pad_nd(
      r, {window, window, window, window}, 1e18);
  at::Tensor best = at::full({h, w}, std::numeric_limits<float>::infinity());
  for (int dy = 0; dy <= 2 * window; ++dy) {
    for (int dx = 0; dx <= 2 * window; ++dx) {
      const at::Tensor shifted = padded.narrow(2, dy, h).narrow(3, dx, w);
      const at::Tensor d = (shifted - q.unsqueeze(0)).pow(2).sum(1).amin(0);
      best = at::minimum(best, d);
    }
  }
  return best.sqrt();
}

}  // namespace

absl::StatusOr<FeatureReference> MakeFeatureReference(const FeatureModel& net,
                                                      const at::Tensor& images) {
  VDM_ASSIGN_OR_RETURN(const at::Tensor e, net.Features(images));
  const at::Tensor x = images.to(at::kByte).contiguous();
  const at::Tensor f = e.contiguous();
  return FeatureReference::Create(
      std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel()),
      f.size(1),
      std::vector<uint8_t>(x.data_ptr<uint8_t>(), x.data_ptr<uint8_t>() + x.numel()),
      x.size(1), x.size(2), x.size(3));
}

absl::StatusOr<at::Tensor> LocalMatchMaps(
    const FeatureReference& reference, const ThoroughSetup& setup,
    const at::Tensor& x_uint8, const std::vector<std::vector<float>>& embeddings,
    const FeatureModel& net) {
  const int64_t n = x_uint8.defined() && x_uint8.dim() == 4 ? x_uint8.size(0) : -1;
  if (n < 0 || static_cast<int64_t>(embeddings.size()) != n) {
    return absl::InvalidArgumentError(
        "local match: images [n, C, H, W] and an embedding per image");
  }
  if (x_uint8.size(1) != reference.channels() ||
      x_uint8.size(2) != reference.height() || x_uint8.size(3) != reference.width()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "local match: the images are not of the reference's shape [",
        reference.channels(), ",", reference.height(), ",", reference.width(), "]"));
  }
  VDM_ASSIGN_OR_RETURN(const at::Tensor own, net.LocalFeatures(x_uint8));
  std::vector<at::Tensor> maps;
  const int64_t size = reference.image_size();
  for (int64_t i = 0; i < n; ++i) {
    const std::vector<Neighbour> near =
        reference.Nearest(embeddings[i], setup.local_neighbours);
    if (near.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "local match: image ", i, "'s embedding is not of the reference's "
          "dimension ", reference.dimension()));
    }
    at::Tensor images = at::empty(
        {static_cast<int64_t>(near.size()), reference.channels(),
         reference.height(), reference.width()},
        at::kByte);
    uint8_t* out = images.data_ptr<uint8_t>();
    for (size_t k = 0; k < near.size(); ++k) {
      std::copy_n(reference.images().data() + near[k].index * size, size,
                  out + k * size);
    }
    VDM_ASSIGN_OR_RETURN(const at::Tensor theirs, net.LocalFeatures(images));
    try {
      maps.push_back(NearestCells(own[i], theirs, setup.local_window));
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("local match: ", e.what()));
    }
  }
  if (maps.empty()) {
    return at::empty({0, own.size(2), own.size(3)}, at::kFloat);
  }
  return at::stack(maps).contiguous();
}

absl::Status AddLocalMatch(const FeatureReference& reference,
                           const ThoroughSetup& setup, const at::Tensor& x_uint8,
                           const FeatureModel& net,
                           std::vector<ImageBpd>* records) {
  std::vector<std::vector<float>> embeddings;
  for (const ImageBpd& r : *records) {
    if (!r.thorough) {
      return absl::InvalidArgumentError(
          "local match: a record without its thorough features");
    }
    embeddings.push_back(r.thorough->embedding);
  }
  torch::NoGradGuard no_grad;
  VDM_ASSIGN_OR_RETURN(const at::Tensor maps,
                       LocalMatchMaps(reference, setup, x_uint8, embeddings, net));
  const int64_t h = maps.size(1), w = maps.size(2);
  const at::Tensor up =
      at::upsample_bilinear2d(maps.unsqueeze(1),
                              {x_uint8.size(2), x_uint8.size(3)},
                              /*align_corners=*/false)
          .squeeze(1)
          .contiguous();
  const int64_t pixels = up.size(1) * up.size(2);
  for (size_t i = 0; i < records->size(); ++i) {
    ThoroughFeatures& t = *(*records)[i].thorough;
    const float* m = maps.data_ptr<float>() + static_cast<int64_t>(i) * h * w;
    t.local_map.assign(m, m + h * w);
    t.local_height = h, t.local_width = w;
    const float* u = up.data_ptr<float>() + static_cast<int64_t>(i) * pixels;
    t.map.assign(u, u + pixels);
  }
  return absl::OkStatus();
}

}  // namespace vdm
