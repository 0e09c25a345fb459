// The thorough anomaly level's local group and map (docs/anomaly.md, "The
// local group"): where an image differs from the training images that look
// most like it.
//
// For each image, its local features (FeatureModel::LocalFeatures, a feature
// per cell of a grid) are matched against those of its
// `setup.local_neighbours` nearest reference images (nearest in the
// feature network's embedding): a cell's value is the Euclidean distance to
// the nearest cell within `setup.local_window` cells of the same place in
// any of them. This is SPADE's sub-image kNN (Cohen and Hoshen 2020),
// restricted to nearby places because the data are aligned: a sleeve is
// compared with sleeves. A pasted patch, a wrong half or a turned garment
// matches nothing near its place; a garment like its neighbours matches
// everywhere. The map upsampled to pixels is the level's anomaly_map, and
// the mean of its largest cells the local group's feature
// (LocalMapFeature, thorough.h).
//
// Cost: one local_features pass per image and per neighbour (the shipped
// CNN: about 4M multiply-adds each, 51 per image, against 24 passes of the
// 2M-parameter denoiser), and (2w + 1)^2 cell comparisons per neighbour.
#ifndef VDM_MODEL_VDM_LOCAL_MATCH_H_
#define VDM_MODEL_VDM_LOCAL_MATCH_H_

#include <ATen/core/Tensor.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/image_scores.h"
#include "model/vdm/thorough.h"

namespace vdm {

class FeatureModel;  // feature_model.h

// The reference of uint8 images [N, C, H, W]: their embeddings by `net`
// and the images (vdm-calibrate's kNN reference).
absl::StatusOr<FeatureReference> MakeFeatureReference(const FeatureModel& net,
                                                      const at::Tensor& images);

// The local match maps [n, h, w] of uint8 images [n, C, H, W], whose
// embeddings (`embeddings`, one per image, in the reference's space) choose
// their neighbours.
absl::StatusOr<at::Tensor> LocalMatchMaps(
    const FeatureReference& reference, const ThoroughSetup& setup,
    const at::Tensor& x_uint8, const std::vector<std::vector<float>>& embeddings,
    const FeatureModel& net);

// The same, into the images' records (`records`, in order, each with its
// thorough features' embedding): ThoroughFeatures::local_map and, upsampled
// bilinearly to H x W, ThoroughFeatures::map.
absl::Status AddLocalMatch(const FeatureReference& reference,
                           const ThoroughSetup& setup, const at::Tensor& x_uint8,
                           const FeatureModel& net,
                           std::vector<ImageBpd>* records);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_LOCAL_MATCH_H_
