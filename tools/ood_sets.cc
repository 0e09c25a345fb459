#include "tools/ood_sets.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace vdm {
namespace {

// A uniform integer in [0, n) from `gen`.
int64_t Uniform(int64_t n, at::Generator& gen) {
  return at::randint(0, n, {1}, gen, at::TensorOptions(at::kLong)).item<int64_t>();
}

// A donor index of `pool` whose label differs from `label`.
int64_t DonorOf(int64_t label, const at::Tensor& pool_labels,
                at::Generator& gen) {
  const at::Tensor others = pool_labels.ne(label).nonzero().flatten();
  return others[Uniform(others.size(0), gen)].item<int64_t>();
}

}  // namespace

at::Tensor RotateQuarter(const at::Tensor& images) {
  return at::rot90(images, 1, {2, 3}).contiguous();
}

DefectSet JoinHalves(const at::Tensor& images, const at::Tensor& labels,
                     const at::Tensor& pool, const at::Tensor& pool_labels,
                     at::Generator& gen) {
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  DefectSet set{images.clone(), at::zeros({n, h, w}, at::kBool)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t donor = DonorOf(labels[i].item<int64_t>(), pool_labels, gen);
    const at::Tensor bottom = pool[donor].narrow(1, h / 2, h - h / 2);
    set.images[i].narrow(1, h / 2, h - h / 2).copy_(bottom);
  }
  set.masks = set.images.ne(images).any(1);
  return set;
}

DefectSet PastePatches(const at::Tensor& images, const at::Tensor& labels,
                       const at::Tensor& pool, const at::Tensor& pool_labels,
                       int size, at::Generator& gen) {
  const int64_t n = images.size(0), h = images.size(2), w = images.size(3);
  const int64_t s = std::min<int64_t>({size, h, w});
  DefectSet set{images.clone(), at::zeros({n, h, w}, at::kBool)};
  for (int64_t i = 0; i < n; ++i) {
    const int64_t donor = DonorOf(labels[i].item<int64_t>(), pool_labels, gen);
    // The donor's window of most ink: a box filter of size s over its sum
    // over channels.
    const at::Tensor ink = pool[donor].to(at::kFloat).sum(0, true).unsqueeze(0);
    const at::Tensor sums =
        at::avg_pool2d(ink, {s, s}, {1, 1}).squeeze(0).squeeze(0);
    const int64_t best = sums.flatten().argmax().item<int64_t>();
    const int64_t dy = best / sums.size(1), dx = best % sums.size(1);
    const int64_t turns = 1 + Uniform(3, gen);
    const at::Tensor patch = at::rot90(
        pool[donor].narrow(1, dy, s).narrow(2, dx, s), turns, {1, 2});
    // The garment's bounding box in image i.
    const at::Tensor on = images[i].gt(0).any(0);
    const at::Tensor rows = on.any(1).nonzero().flatten();
    const at::Tensor cols = on.any(0).nonzero().flatten();
    int64_t y0 = 0, y1 = h, x0 = 0, x1 = w;
    if (rows.size(0) > 0 && cols.size(0) > 0) {
      y0 = rows.min().item<int64_t>(), y1 = rows.max().item<int64_t>() + 1;
      x0 = cols.min().item<int64_t>(), x1 = cols.max().item<int64_t>() + 1;
    }
    if (y1 - y0 < s) y0 = 0, y1 = h;
    if (x1 - x0 < s) x0 = 0, x1 = w;
    const int64_t y = y0 + Uniform(y1 - y0 - s + 1, gen);
    const int64_t x = x0 + Uniform(x1 - x0 - s + 1, gen);
    set.images[i].narrow(1, y, s).narrow(2, x, s).copy_(patch);
  }
  set.masks = set.images.ne(images).any(1);
  return set;
}

at::Tensor KthNearestDistance(const at::Tensor& query,
                              const at::Tensor& reference, int k) {
  const at::Tensor q = query.to(at::kDouble), r = reference.to(at::kDouble);
  k = std::max(1, std::min<int>(k, static_cast<int>(r.size(0))));
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < q.size(0); i += 256) {
    const at::Tensor d = at::cdist(q.narrow(0, i, std::min<int64_t>(256, q.size(0) - i)), r);
    out.push_back(std::get<0>(d.kthvalue(k, 1)));
  }
  return out.empty() ? at::empty({0}, at::kDouble) : at::cat(out);
}

double Auroc(const std::vector<double>& pos, const std::vector<double>& neg) {
  if (pos.empty() || neg.empty()) return std::numeric_limits<double>::quiet_NaN();
  // Rank-sum over the pooled, sorted scores (ties get the mean rank).
  std::vector<std::pair<double, int>> all;
  for (double v : pos) all.emplace_back(v, 1);
  for (double v : neg) all.emplace_back(v, 0);
  std::sort(all.begin(), all.end());
  double rank_sum = 0;
  for (size_t i = 0; i < all.size();) {
    size_t j = i;
    while (j < all.size() && all[j].first == all[i].first) ++j;
    const double mean_rank = 0.5 * static_cast<double>(i + 1 + j);
    for (size_t t = i; t < j; ++t) {
      if (all[t].second == 1) rank_sum += mean_rank;
    }
    i = j;
  }
  const double np = static_cast<double>(pos.size());
  const double nn = static_cast<double>(neg.size());
  return (rank_sum - np * (np + 1) / 2) / (np * nn);
}

double PixelAuroc(const at::Tensor& maps, const at::Tensor& masks) {
  const at::Tensor m = maps.to(at::kDouble).contiguous().flatten();
  const at::Tensor l = masks.to(at::kBool).contiguous().flatten();
  const at::Tensor p = m.masked_select(l), q = m.masked_select(l.logical_not());
  return Auroc(std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + p.numel()),
               std::vector<double>(q.data_ptr<double>(), q.data_ptr<double>() + q.numel()));
}

}  // namespace vdm
