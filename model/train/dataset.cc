#include "model/train/dataset.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <random>
#include <utility>
#include <vector>

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

bool IsPng(const std::filesystem::path& path) {
  std::string ext = path.extension().string();
  for (char& c : ext) c = static_cast<char>(std::tolower(c));
  return ext == ".png";
}

// The sorted names of `dir`'s visible entries.
std::vector<std::filesystem::path> SortedEntries(const std::string& dir) {
  std::vector<std::filesystem::path> out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().filename().string().rfind('.', 0) == 0) continue;
    out.push_back(e.path());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// A class subfolder's label: its name as an integer in [0, num_classes), or
// 0 for an unconditional model (labels are not used).
absl::StatusOr<int64_t> FolderLabel(const std::filesystem::path& path,
                                    int num_classes) {
  const std::string name = path.filename().string();
  const bool digits = !name.empty() && name.size() < 6 &&
                      std::all_of(name.begin(), name.end(), ::isdigit);
  const int64_t label = digits ? std::stoll(name) : -1;
  if (label < 0 || (num_classes > 0 && label >= num_classes)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "subfolder ", path.string(), " is not a class number 0..",
        std::max(0, num_classes - 1), " (PNG datasets: *.png files, or ",
        "subfolders named by class holding *.png files)"));
  }
  return num_classes > 0 ? label : 0;
}

// (file, label) for every PNG of a PNG dataset folder (see dataset.h).
absl::StatusOr<std::vector<std::pair<std::string, int64_t>>> ListPngs(
    const std::string& dir, int num_classes) {
  std::vector<std::pair<std::string, int64_t>> files;
  bool flat = false, nested = false;
  for (const auto& entry : SortedEntries(dir)) {
    if (std::filesystem::is_directory(entry)) {
      nested = true;
      VDM_ASSIGN_OR_RETURN(int64_t label, FolderLabel(entry, num_classes));
      for (const auto& file : SortedEntries(entry.string())) {
        if (IsPng(file)) files.emplace_back(file.string(), label);
      }
    } else if (IsPng(entry)) {
      flat = true;
      files.emplace_back(entry.string(), num_classes);  // "no label"
    }
  }
  if (flat && nested) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, " holds both *.png files and class subfolders: use one layout"));
  }
  if (files.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, " holds no *.png files (nor class subfolders of ",
                     "them) and no IDX files"));
  }
  return files;
}

absl::Status DecodeInto(const std::string& path, const ImageShape& shape,
                        uint8_t* dst) {
  VDM_ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  absl::StatusOr<Image8> image = DecodePng(bytes, shape.channels);
  if (!image.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": not a readable PNG: ", image.status().message()));
  }
  if (image->height != shape.height || image->width != shape.width) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": image shape mismatch: ", image->width, "x", image->height,
        " pixels but the model expects ", shape.width, "x", shape.height));
  }
  std::copy(image->pixels.begin(), image->pixels.end(), dst);
  return absl::OkStatus();
}

}  // namespace

Dataset Dataset::Slice(int64_t begin, int64_t end) const {
  return Dataset{images.slice(0, begin, end), labels.slice(0, begin, end)};
}

Dataset WithoutClass(const Dataset& data, int64_t label) {
  if (data.size() == 0) return data;
  const at::Tensor keep = data.labels.ne(label).nonzero().flatten();
  return Dataset{data.images.index_select(0, keep).contiguous(),
                 data.labels.index_select(0, keep).contiguous()};
}

at::Tensor MutatePixels(const at::Tensor& images, double rate,
                        at::Generator& gen) {
  const at::Tensor u = at::rand(images.sizes(), gen, at::kFloat);
  const at::Tensor values =
      at::randint(0, 256, images.sizes(), gen, at::TensorOptions(at::kLong))
          .to(images.scalar_type());
  return at::where(u < rate, values, images);
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

absl::StatusOr<Dataset> LoadPngDataset(const std::string& dir,
                                       const ImageShape& shape, int num_classes,
                                       int64_t limit) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(
        absl::StrCat("data directory ", dir, " does not exist"));
  }
  std::vector<std::pair<std::string, int64_t>> files;
  try {
    VDM_ASSIGN_OR_RETURN(files, ListPngs(dir, num_classes));
  } catch (const std::filesystem::filesystem_error& e) {
    return absl::InvalidArgumentError(absl::StrCat("listing ", dir, ": ",
                                                   e.what()));
  }
  std::mt19937_64 rng(0x5eed);  // fixed: the same split for every seed
  std::shuffle(files.begin(), files.end(), rng);
  if (limit > 0 && static_cast<int64_t>(files.size()) > limit) {
    files.resize(limit);
  }
  const int64_t n = static_cast<int64_t>(files.size());
  Dataset data;
  data.images = at::empty({n, shape.channels, shape.height, shape.width},
                          at::kByte);
  data.labels = at::empty({n}, at::kLong);
  uint8_t* pixels = data.images.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    VDM_RETURN_IF_ERROR(
        DecodeInto(files[i].first, shape, pixels + i * shape.dims()));
    data.labels[i] = files[i].second;
  }
  return data;
}

absl::StatusOr<Dataset> LoadDataset(const std::string& dir,
                                    const std::string& split,
                                    const ImageShape& shape, int num_classes,
                                    int64_t limit) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path base(dir);
  const bool idx =
      fs::exists(base / "train-images-idx3-ubyte.gz", ec) ||
      fs::exists(base / "train-images-idx3-ubyte", ec) ||
      fs::exists(base / (split + "-images-idx3-ubyte.gz"), ec) ||
      fs::exists(base / (split + "-images-idx3-ubyte"), ec);
  if (idx || !fs::is_directory(base, ec)) {
    return LoadIdxDataset(dir, split, shape, num_classes, limit);
  }
  if (split == "train") {
    const fs::path sub = base / "train";
    return LoadPngDataset(fs::is_directory(sub, ec) ? sub.string() : dir,
                          shape, num_classes, limit);
  }
  for (const char* name : {"test", "t10k"}) {
    if (fs::is_directory(base / name, ec)) {
      return LoadPngDataset((base / name).string(), shape, num_classes, limit);
    }
  }
  return Dataset{};  // no test split
}

}  // namespace vdm
