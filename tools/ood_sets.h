// Out-of-distribution sets that keep the data's pixel statistics (issue 23,
// docs/anomaly.md "Local defects"), made from test images with no download,
// and the feature-kNN baseline they are judged against. Every set draws its
// randomness from the generator it is given, in a fixed order, so a seed
// makes the same set. Images are uint8 [n, C, H, W]; masks bool [n, H, W]
// mark the changed pixels (what anomaly_map should find).
// Thread-compatible; pure functions of their inputs and the generator.
#ifndef VDM_TOOLS_OOD_SETS_H_
#define VDM_TOOLS_OOD_SETS_H_

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace vdm {

struct DefectSet {
  at::Tensor images;  // uint8 [n, C, H, W]
  at::Tensor masks;   // bool [n, H, W]: the pixels the defect changed
};

// Each image rotated by 90 degrees (counter-clockwise).
at::Tensor RotateQuarter(const at::Tensor& images);

// Image i's top half joined to the bottom half of a donor from `pool` of
// another class (pool_labels), drawn uniformly among those; the mask is the
// bottom half's pixels that changed. labels [n], pool_labels [m] int64.
DefectSet JoinHalves(const at::Tensor& images, const at::Tensor& labels,
                     const at::Tensor& pool, const at::Tensor& pool_labels,
                     at::Generator& gen);

// A `size` x `size` patch of a donor of another class, cut where the donor
// has the most ink (the window of largest sum, so it is garment, not
// background), rotated by 90, 180 or 270 degrees, pasted at a uniform
// position whose window lies inside image i's garment (its bounding box of
// pixels > 0; the whole image when that is smaller than the patch). The
// mask is the pasted window's pixels that changed.
DefectSet PastePatches(const at::Tensor& images, const at::Tensor& labels,
                       const at::Tensor& pool, const at::Tensor& pool_labels,
                       int size, at::Generator& gen);

// The Euclidean distance from each row of `query` [m, D] to its k-th
// nearest row of `reference` [n, D] (k >= 1, k <= n), float64 [m]: the
// feature-kNN anomaly score (larger = farther from the training data).
at::Tensor KthNearestDistance(const at::Tensor& query,
                              const at::Tensor& reference, int k);

// AUROC of `pos` against `neg` (higher = positive), ties counted half; NaN
// when either is empty.
double Auroc(const std::vector<double>& pos, const std::vector<double>& neg);

// Pixel AUROC of per-pixel scores maps [n, H, W] against masks [n, H, W]:
// the pixels inside the masks are the positives, the rest of the same
// images the negatives.
double PixelAuroc(const at::Tensor& maps, const at::Tensor& masks);

}  // namespace vdm

#endif  // VDM_TOOLS_OOD_SETS_H_
