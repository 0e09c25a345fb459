#include "model/train/dataset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "model/vdm/image_io.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// The path of `<dir>/<name>.gz`, or of the uncompressed `<dir>/<name>`.
absl::StatusOr<std::string> FindIdxFile(const std::string& dir,
                                        const std::string& name) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("data directory ", dir, " does not exist"));
  }
  const std::string base = (std::filesystem::path(dir) / name).string();
  for (const std::string& path : {base + ".gz", base}) {
    if (std::filesystem::is_regular_file(path, ec)) return path;
  }
  return absl::NotFoundError(absl::StrCat(
      "data directory ", dir, " has no file ", name, ".gz (or ", name, ")"));
}

absl::StatusOr<at::Tensor> ReadImages(const std::string& path,
                                      const ImageShape& shape, int64_t limit) {
  VDM_ASSIGN_OR_RETURN(IdxArray idx, ReadIdx(path));
  const std::string want =
      absl::StrCat(shape.channels, "x", shape.height, "x", shape.width);
  // 3 dims: N x H x W gray images; 4 dims: N x C x H x W.
  int64_t channels = 0, height = 0, width = 0;
  if (idx.dims.size() == 3) {
    channels = 1;
    height = idx.dims[1];
    width = idx.dims[2];
  } else if (idx.dims.size() == 4) {
    channels = idx.dims[1];
    height = idx.dims[2];
    width = idx.dims[3];
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": images must have 3 or 4 dimensions, got [",
                     absl::StrJoin(idx.dims, ", "), "]"));
  }
  if (channels != shape.channels || height != shape.height ||
      width != shape.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": image shape mismatch: the file holds ", channels, "x", height,
        "x", width, " images but the model expects ", want, " (CxHxW)"));
  }
  int64_t n = idx.dims[0];
  if (limit > 0) n = std::min(n, limit);
  at::Tensor all = at::from_blob(
      idx.data.data(), {idx.dims[0], channels, height, width}, at::kByte);
  return all.slice(0, 0, n).clone();
}

absl::StatusOr<at::Tensor> ReadLabels(const std::string& path, int64_t n,
                                      int num_classes) {
  VDM_ASSIGN_OR_RETURN(IdxArray idx, ReadIdx(path));
  if (idx.dims.size() != 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": labels must have 1 dimension, got ", idx.dims.size()));
  }
  if (idx.dims[0] < n) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", idx.dims[0], " labels for ", n, " images"));
  }
  at::Tensor labels = at::from_blob(idx.data.data(), {idx.dims[0]}, at::kByte)
                          .slice(0, 0, n)
                          .to(at::kLong);
  if (num_classes > 0 && n > 0) {
    const int64_t max_label = labels.max().item<int64_t>();
    if (max_label >= num_classes) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": label ", max_label, " is out of range: the model has ",
          num_classes, " classes (labels 0..", num_classes - 1, ")"));
    }
  }
  return labels;
}

}  // namespace

Dataset Dataset::Slice(int64_t begin, int64_t end) const {
  return Dataset{images.slice(0, begin, end), labels.slice(0, begin, end)};
}

absl::StatusOr<Dataset> LoadIdxDataset(const std::string& dir,
                                       const std::string& split,
                                       const ImageShape& shape, int num_classes,
                                       int64_t limit) {
  VDM_ASSIGN_OR_RETURN(std::string images_path,
                       FindIdxFile(dir, split + "-images-idx3-ubyte"));
  VDM_ASSIGN_OR_RETURN(std::string labels_path,
                       FindIdxFile(dir, split + "-labels-idx1-ubyte"));
  Dataset data;
  VDM_ASSIGN_OR_RETURN(data.images, ReadImages(images_path, shape, limit));
  VDM_ASSIGN_OR_RETURN(data.labels,
                       ReadLabels(labels_path, data.size(), num_classes));
  if (data.size() == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(images_path, ": holds no images"));
  }
  return data;
}

}  // namespace vdm
