// Image codecs and dataset files, free of torch: 8-bit images as PNG (libpng)
// and IDX files (gzip or plain, read with zlib). Used by the library, the
// trainer and the client. All functions are thread-safe (no shared state).
#ifndef VDM_MODEL_VDM_IMAGE_IO_H_
#define VDM_MODEL_VDM_IMAGE_IO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/image.h"

namespace vdm {

// Encodes 1 (gray) or 3 (RGB) channel images as PNG bytes.
absl::StatusOr<std::string> EncodePng(const Image8& image);

// Decodes PNG bytes. `want_channels` 1 converts to gray, 3 to RGB, 0 keeps the
// file's own (gray or RGB; alpha is dropped, 16-bit is reduced to 8).
absl::StatusOr<Image8> DecodePng(const std::string& png, int want_channels = 0);

// Tiles equally shaped images into a grid with `columns` columns and a
// `pad`-pixel border of value `pad_value`.
absl::StatusOr<Image8> MakeGrid(const std::vector<Image8>& images, int columns,
                                int pad = 2, uint8_t pad_value = 255);

// An IDX file: unsigned-byte data with its dimensions.
struct IdxArray {
  std::vector<int64_t> dims;
  std::vector<uint8_t> data;
};

// Reads an IDX file of unsigned bytes (magic 0x00000800 | ndims), gzip-
// compressed or not. Errors name the file and the problem (missing, bad
// magic, truncated).
absl::StatusOr<IdxArray> ReadIdx(const std::string& path);

// Reads an IDX images file (3 dims: N x H x W) as N gray images; `limit` > 0
// keeps only the first `limit`.
absl::StatusOr<std::vector<Image8>> ReadIdxImages(const std::string& path,
                                                  int64_t limit = 0);

// Reads a whole file / writes a whole file atomically (temp file + rename).
absl::StatusOr<std::string> ReadFile(const std::string& path);
absl::Status WriteFileAtomic(const std::string& path, const std::string& data);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_IMAGE_IO_H_
