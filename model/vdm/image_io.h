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
// compression_level: zlib's 0..9, -1 = its default (6).
absl::StatusOr<std::string> EncodePng(const Image8& image,
                                      int compression_level = -1);

// Decodes PNG bytes. `want_channels` 1 converts to gray, 3 to RGB, 0 keeps the
// file's own (gray or RGB; alpha is dropped, 16-bit is reduced to 8).
// Files larger than 2^26 pixels or 16384 on a side are refused from their
// header.
absl::StatusOr<Image8> DecodePng(const std::string& png, int want_channels = 0);

// Decodes untrusted PNG bytes that must have `shape` (1 or 3 channels). The
// header alone decides, before any pixel memory is allocated: a different
// width or height, an alpha channel (or tRNS) and a color image for a gray
// shape are refused with a message saying what was found; gray is expanded
// to RGB for a 3-channel shape. Ancillary chunks are bounded (8 MiB each
// decompressed) and trailing chunks are not read, so the work is bounded by
// the shape, not by what the file claims.
absl::StatusOr<Image8> DecodePngAs(const std::string& png,
                                   const ImageShape& shape);

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
