#include "model/vdm/image_io.h"

#include <fcntl.h>
#include <png.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// Largest PNG side and pixel count DecodePng agrees to decode, and the most
// memory one ancillary chunk (zTXt, iCCP, ...) may take when decompressed:
// a small file must not make it allocate gigabytes.
constexpr uint32_t kMaxPngSide = 16384;
constexpr uint64_t kMaxPngPixels = uint64_t{1} << 26;
constexpr png_alloc_size_t kMaxPngChunkBytes = png_alloc_size_t{8} << 20;
// Largest IDX payload we agree to read.
constexpr int64_t kMaxIdxBytes = int64_t{1} << 34;
// IDX data type code of unsigned bytes.
constexpr int kIdxUnsignedByte = 0x08;

// ---- PNG -------------------------------------------------------------------
// libpng reports errors by longjmp. The functions that call libpng keep every
// object with a destructor alive across the setjmp (declared before it), so no
// destructor is ever skipped.

struct PngErrorBuffer {
  char message[256] = "unknown libpng error";
};

void PngError(png_structp png, png_const_charp message) {
  auto* buffer = static_cast<PngErrorBuffer*>(png_get_error_ptr(png));
  std::snprintf(buffer->message, sizeof(buffer->message), "%s", message);
  png_longjmp(png, 1);
}

void PngWarning(png_structp, png_const_charp) {}

struct PngReader {
  const std::string* data;
  size_t offset;
};

void PngRead(png_structp png, png_bytep out, png_size_t length) {
  auto* reader = static_cast<PngReader*>(png_get_io_ptr(png));
  if (reader->data->size() - reader->offset < length) {
    png_error(png, "truncated PNG data");
  }
  std::memcpy(out, reader->data->data() + reader->offset, length);
  reader->offset += length;
}

void PngWrite(png_structp png, png_bytep in, png_size_t length) {
  static_cast<std::string*>(png_get_io_ptr(png))
      ->append(reinterpret_cast<const char*>(in), length);
}

void PngFlush(png_structp) {}

// Converts interleaved HWC bytes to planar CHW, or back when `to_planar` is
// false.
void Reorder(const uint8_t* in, int channels, int pixels, bool to_planar,
             uint8_t* out) {
  for (int p = 0; p < pixels; ++p) {
    for (int c = 0; c < channels; ++c) {
      if (to_planar) {
        out[c * pixels + p] = in[p * channels + c];
      } else {
        out[p * channels + c] = in[c * pixels + p];
      }
    }
  }
}

// Sets the read transforms that turn any PNG into 8-bit gray or RGB with
// `want_channels` channels (0 = the file's own).
void SetReadTransforms(png_structp png, png_infop info, int want_channels) {
  const int color_type = png_get_color_type(png, info);
  const int bit_depth = png_get_bit_depth(png, info);
  if (bit_depth == 16) png_set_scale_16(png);
  if (color_type == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(png);
  if (color_type == PNG_COLOR_TYPE_GRAY && bit_depth < 8) {
    png_set_expand_gray_1_2_4_to_8(png);
  }
  // A tRNS chunk becomes an alpha channel when a palette is expanded.
  if ((color_type & PNG_COLOR_MASK_ALPHA) != 0 ||
      png_get_valid(png, info, PNG_INFO_tRNS) != 0) {
    png_set_strip_alpha(png);
  }
  const bool is_color = (color_type & PNG_COLOR_MASK_COLOR) != 0;
  if (want_channels == 1 && is_color) {
    png_set_rgb_to_gray_fixed(png, /*error_action=*/1, -1, -1);
  } else if (want_channels == 3 && !is_color) {
    png_set_gray_to_rgb(png);
  }
  png_set_interlace_handling(png);
  png_read_update_info(png, info);
}

// Decodes into `image`; on failure returns false with `error` set.
// With `expect` (untrusted input of a known shape), the header alone
// decides: a different size, an alpha channel or color for a gray shape is
// refused before anything is allocated, and trailing chunks are not read.
bool DecodePngRaw(const std::string& data, int want_channels,
                  const ImageShape* expect, Image8* image,
                  PngErrorBuffer* error) {
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, error,
                                           PngError, PngWarning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  PngReader reader{&data, 0};
  std::vector<uint8_t> interleaved;
  std::vector<png_bytep> rows;
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    return false;
  }
  png_set_user_limits(png, kMaxPngSide, kMaxPngSide);
  png_set_chunk_malloc_max(png, kMaxPngChunkBytes);
  png_set_read_fn(png, &reader, PngRead);
  png_read_info(png, info);
  {
    const uint64_t w = png_get_image_width(png, info);
    const uint64_t h = png_get_image_height(png, info);
    const int type = png_get_color_type(png, info);
    if (expect == nullptr && w * h > kMaxPngPixels) {
      std::snprintf(error->message, sizeof(error->message),
                    "PNG declares %llux%llu pixels, more than %llu",
                    static_cast<unsigned long long>(w),
                    static_cast<unsigned long long>(h),
                    static_cast<unsigned long long>(kMaxPngPixels));
      png_longjmp(png, 1);
    }
    if (expect != nullptr) {
      const char* problem = nullptr;
      if (w != static_cast<uint64_t>(expect->width) ||
          h != static_cast<uint64_t>(expect->height)) {
        problem = "size";
      } else if ((type & PNG_COLOR_MASK_ALPHA) != 0 ||
                 png_get_valid(png, info, PNG_INFO_tRNS) != 0) {
        problem = "alpha";
      } else if (expect->channels == 1 &&
                 (type & PNG_COLOR_MASK_COLOR) != 0) {
        problem = "color";
      }
      // Only snprintf here: png_longjmp skips destructors, so no object
      // that owns memory may be alive past this point.
      if (problem != nullptr) {
        if (problem[0] == 's') {
          std::snprintf(error->message, sizeof(error->message),
                        "image is %llux%llu (HxW), the model expects "
                        "%dx%dx%d (CxHxW)",
                        static_cast<unsigned long long>(h),
                        static_cast<unsigned long long>(w), expect->channels,
                        expect->height, expect->width);
        } else if (problem[0] == 'a') {
          std::snprintf(error->message, sizeof(error->message), "%s",
                        "PNG has an alpha channel (transparency), which the "
                        "model has no use for; send an opaque image");
        } else {
          std::snprintf(error->message, sizeof(error->message), "%s",
                        "PNG is in color, the model takes 1-channel (gray) "
                        "images; convert it to gray first");
        }
        png_longjmp(png, 1);
      }
    }
  }
  SetReadTransforms(png, info, want_channels);
  const int channels = png_get_channels(png, info);
  const uint32_t height = png_get_image_height(png, info);
  const uint32_t width = png_get_image_width(png, info);
  if (png_get_bit_depth(png, info) != 8 || (channels != 1 && channels != 3)) {
    png_error(png, "unsupported PNG layout after conversion");
  }
  interleaved.resize(static_cast<size_t>(channels) * height * width);
  rows.resize(height);
  for (uint32_t y = 0; y < height; ++y) {
    rows[y] = interleaved.data() + static_cast<size_t>(y) * width * channels;
  }
  png_read_image(png, rows.data());
  if (expect == nullptr) png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  image->channels = channels;
  image->height = static_cast<int>(height);
  image->width = static_cast<int>(width);
  image->pixels.resize(interleaved.size());
  Reorder(interleaved.data(), channels, image->height * image->width,
          /*to_planar=*/true, image->pixels.data());
  return true;
}

// Encodes interleaved rows; on failure returns false with `error` set.
bool EncodePngRaw(const Image8& image, int level, std::string* out,
                  PngErrorBuffer* error) {
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, error,
                                            PngError, PngWarning);
  if (png == nullptr) return false;
  png_infop info = png_create_info_struct(png);
  const int pixels = image.height * image.width;
  std::vector<uint8_t> interleaved(image.pixels.size());
  Reorder(image.pixels.data(), image.channels, pixels, /*to_planar=*/false,
          interleaved.data());
  std::vector<png_bytep> rows(image.height);
  for (int y = 0; y < image.height; ++y) {
    rows[y] = interleaved.data() +
              static_cast<size_t>(y) * image.width * image.channels;
  }
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    return false;
  }
  png_set_write_fn(png, out, PngWrite, PngFlush);
  if (level >= 0) png_set_compression_level(png, level);
  png_set_IHDR(png, info, image.width, image.height, 8,
               image.channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB,
               PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  png_write_image(png, rows.data());
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return true;
}

absl::Status CheckImage(const Image8& image, const char* what) {
  if (image.channels != 1 && image.channels != 3) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: channels must be 1 or 3, got %d", what, image.channels));
  }
  if (image.height <= 0 || image.width <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: height and width must be positive, got %dx%d",
                        what, image.height, image.width));
  }
  const size_t want =
      static_cast<size_t>(image.channels) * image.height * image.width;
  if (image.pixels.size() != want) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %d pixel bytes for a %dx%dx%d image (want %d)", what,
        image.pixels.size(), image.channels, image.height, image.width, want));
  }
  return absl::OkStatus();
}

// Checks that every image is valid and shaped like the first.
absl::Status CheckSameShape(const std::vector<Image8>& images) {
  const Image8& first = images[0];
  for (size_t i = 0; i < images.size(); ++i) {
    VDM_RETURN_IF_ERROR(CheckImage(images[i], "MakeGrid"));
    if (images[i].channels != first.channels ||
        images[i].height != first.height || images[i].width != first.width) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "MakeGrid: image %d is %dx%dx%d, image 0 is %dx%dx%d", i,
          images[i].channels, images[i].height, images[i].width, first.channels,
          first.height, first.width));
    }
  }
  return absl::OkStatus();
}

// An error for a failed system call on `path`; a missing file is NotFound.
absl::Status FileError(const std::string& path, const char* what, int error) {
  if (error == ENOENT) {
    return absl::NotFoundError(absl::StrCat(path, ": no such file"));
  }
  return absl::UnavailableError(
      absl::StrCat(path, ": ", what, ": ", std::strerror(error)));
}

// ---- IDX -------------------------------------------------------------------

// Closes a gzFile on scope exit.
struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// Reads up to `length` bytes and returns how many it read (fewer only at the
// end of the file); fails on a read or decompression error.
absl::StatusOr<size_t> GzReadUpTo(gzFile file, const std::string& path,
                                  void* out, size_t length) {
  auto* bytes = static_cast<uint8_t*>(out);
  size_t done = 0;
  while (done < length) {
    const unsigned chunk =
        static_cast<unsigned>(std::min<size_t>(length - done, 1u << 24));
    const int got = gzread(file, bytes + done, chunk);
    if (got < 0) {
      int code = 0;
      const char* message = gzerror(file, &code);
      return absl::DataLossError(
          absl::StrCat(path, ": cannot read IDX file: ", message));
    }
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

absl::StatusOr<GzFile> OpenGz(const std::string& path) {
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return FileError(path, "cannot stat", errno);
  }
  if (S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": is a directory"));
  }
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) return FileError(path, "cannot open", errno);
  return GzFile(file);
}

// Reads the magic and the dimensions; checks the type and the total size.
absl::StatusOr<std::vector<int64_t>> ReadIdxHeader(gzFile file,
                                                   const std::string& path) {
  uint8_t magic[4];
  VDM_ASSIGN_OR_RETURN(size_t got, GzReadUpTo(file, path, magic, 4));
  if (got < 4) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": not an IDX file (shorter than its 4-byte magic)"));
  }
  if (magic[0] != 0 || magic[1] != 0 || magic[3] == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: not an IDX file: bad magic 0x%02x%02x%02x%02x (want "
        "0x000008NN)",
        path, magic[0], magic[1], magic[2], magic[3]));
  }
  if (magic[2] != kIdxUnsignedByte) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: IDX data type 0x%02x is not supported (only unsigned byte, 0x08)",
        path, magic[2]));
  }
  std::vector<int64_t> dims(magic[3]);
  int64_t total = 1;
  for (int64_t& dim : dims) {
    uint8_t be[4];
    VDM_ASSIGN_OR_RETURN(got, GzReadUpTo(file, path, be, 4));
    if (got < 4) {
      return absl::DataLossError(absl::StrFormat(
          "%s: truncated IDX file: the header ends before its %d dimensions",
          path, dims.size()));
    }
    dim = (int64_t{be[0]} << 24) | (int64_t{be[1]} << 16) |
          (int64_t{be[2]} << 8) | int64_t{be[3]};
    if (dim > 0 && total > kMaxIdxBytes / dim) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": IDX dimensions describe more than ",
                       kMaxIdxBytes, " bytes"));
    }
    total *= dim;
  }
  return dims;
}

}  // namespace

absl::StatusOr<std::string> EncodePng(const Image8& image,
                                      int compression_level) {
  VDM_RETURN_IF_ERROR(CheckImage(image, "EncodePng"));
  if (compression_level < -1 || compression_level > 9) {
    return absl::InvalidArgumentError(absl::StrCat(
        "EncodePng: compression level must be -1..9, got ", compression_level));
  }
  std::string out;
  PngErrorBuffer error;
  if (!EncodePngRaw(image, compression_level, &out, &error)) {
    return absl::InternalError(
        absl::StrCat("EncodePng: libpng failed: ", error.message));
  }
  return out;
}

absl::StatusOr<Image8> DecodePng(const std::string& png, int want_channels) {
  if (want_channels != 0 && want_channels != 1 && want_channels != 3) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "DecodePng: want_channels must be 0, 1 or 3, got %d", want_channels));
  }
  if (png.size() < 8 ||
      png_sig_cmp(reinterpret_cast<png_const_bytep>(png.data()), 0, 8) != 0) {
    return absl::InvalidArgumentError(
        "DecodePng: data is not a PNG file (bad signature)");
  }
  Image8 image;
  PngErrorBuffer error;
  if (!DecodePngRaw(png, want_channels, nullptr, &image, &error)) {
    return absl::InvalidArgumentError(
        absl::StrCat("DecodePng: invalid PNG: ", error.message));
  }
  return image;
}

absl::StatusOr<Image8> DecodePngAs(const std::string& png,
                                   const ImageShape& shape) {
  if (shape.channels != 1 && shape.channels != 3) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "DecodePngAs: the shape must have 1 or 3 channels, has %d",
        shape.channels));
  }
  if (png.size() < 8 ||
      png_sig_cmp(reinterpret_cast<png_const_bytep>(png.data()), 0, 8) != 0) {
    return absl::InvalidArgumentError(
        "not a valid PNG: data is not a PNG file (bad signature)");
  }
  Image8 image;
  PngErrorBuffer error;
  if (!DecodePngRaw(png, shape.channels, &shape, &image, &error)) {
    // The header checks say what they found; libpng's own errors mean the
    // file is broken.
    const absl::string_view message(error.message);
    if (absl::StartsWith(message, "image is") || absl::StartsWith(message, "PNG ")) {
      return absl::InvalidArgumentError(message);
    }
    return absl::InvalidArgumentError(absl::StrCat("not a valid PNG: ", message));
  }
  return image;
}

absl::StatusOr<Image8> MakeGrid(const std::vector<Image8>& images, int columns,
                                int pad, uint8_t pad_value) {
  if (images.empty()) return absl::InvalidArgumentError("MakeGrid: no images");
  if (columns <= 0 || pad < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MakeGrid: need columns > 0 and pad >= 0, got %d and %d", columns,
        pad));
  }
  VDM_RETURN_IF_ERROR(CheckSameShape(images));
  const Image8& first = images[0];
  const int count = static_cast<int>(images.size());
  const int rows = (count + columns - 1) / columns;
  Image8 grid;
  grid.channels = first.channels;
  grid.height = rows * first.height + (rows + 1) * pad;
  grid.width = columns * first.width + (columns + 1) * pad;
  const size_t plane = static_cast<size_t>(grid.height) * grid.width;
  grid.pixels.assign(plane * grid.channels, pad_value);
  for (int i = 0; i < count; ++i) {
    const int top = pad + (i / columns) * (first.height + pad);
    const int left = pad + (i % columns) * (first.width + pad);
    for (int c = 0; c < grid.channels; ++c) {
      for (int y = 0; y < first.height; ++y) {
        const uint8_t* src =
            images[i].pixels.data() +
            (static_cast<size_t>(c) * first.height + y) * first.width;
        uint8_t* dst = grid.pixels.data() + c * plane +
                       static_cast<size_t>(top + y) * grid.width + left;
        std::copy(src, src + first.width, dst);
      }
    }
  }
  return grid;
}

absl::StatusOr<IdxArray> ReadIdx(const std::string& path) {
  VDM_ASSIGN_OR_RETURN(GzFile file, OpenGz(path));
  IdxArray array;
  VDM_ASSIGN_OR_RETURN(array.dims, ReadIdxHeader(file.get(), path));
  int64_t total = 1;
  for (int64_t dim : array.dims) total *= dim;
  // Grow as the data arrives, so a lying header cannot make us allocate
  // more than the file holds.
  constexpr int64_t kChunk = int64_t{1} << 24;
  for (int64_t done = 0; done < total;) {
    const int64_t chunk = std::min(kChunk, total - done);
    array.data.resize(static_cast<size_t>(done + chunk));
    VDM_ASSIGN_OR_RETURN(const size_t got,
                         GzReadUpTo(file.get(), path, array.data.data() + done,
                                    static_cast<size_t>(chunk)));
    done += static_cast<int64_t>(got);
    if (static_cast<int64_t>(got) < chunk) {
      return absl::DataLossError(absl::StrFormat(
          "%s: truncated IDX file: the header promises %d data bytes, the "
          "file has %d",
          path, total, done));
    }
  }
  return array;
}

absl::StatusOr<std::vector<Image8>> ReadIdxImages(const std::string& path,
                                                  int64_t limit) {
  if (limit < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("ReadIdxImages: limit must be >= 0, got ", limit));
  }
  VDM_ASSIGN_OR_RETURN(const IdxArray array, ReadIdx(path));
  if (array.dims.size() != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        path,
        ": an IDX images file needs 3 dimensions (N x H x W), this one "
        "has ",
        array.dims.size()));
  }
  const int64_t n = array.dims[0];
  const int64_t height = array.dims[1];
  const int64_t width = array.dims[2];
  if (height <= 0 || width <= 0 || height > kMaxPngSide ||
      width > kMaxPngSide) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: unsupported image size %dx%d", path, height, width));
  }
  const int64_t count = limit > 0 ? std::min(limit, n) : n;
  const size_t size = static_cast<size_t>(height * width);
  std::vector<Image8> images(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    Image8& image = images[static_cast<size_t>(i)];
    image.channels = 1;
    image.height = static_cast<int>(height);
    image.width = static_cast<int>(width);
    const auto begin = array.data.begin() + static_cast<ptrdiff_t>(i * size);
    image.pixels.assign(begin, begin + static_cast<ptrdiff_t>(size));
  }
  return images;
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return FileError(path, "cannot open", errno);
  std::string data;
  char buffer[1 << 16];
  size_t got;
  while ((got = std::fread(buffer, 1, sizeof(buffer), file)) > 0) {
    data.append(buffer, got);
  }
  const bool failed = std::ferror(file) != 0;
  const int error = errno;
  std::fclose(file);
  if (failed) {
    return absl::DataLossError(
        absl::StrCat(path, ": read failed: ", std::strerror(error)));
  }
  return data;
}

absl::Status WriteFileAtomic(const std::string& path, const std::string& data) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  const int fd =
      open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    return absl::UnavailableError(
        absl::StrCat(tmp, ": cannot create: ", std::strerror(errno)));
  }
  size_t done = 0;
  int error = 0;
  while (done < data.size() && error == 0) {
    const ssize_t wrote = write(fd, data.data() + done, data.size() - done);
    if (wrote < 0 && errno != EINTR) error = errno;
    if (wrote > 0) done += static_cast<size_t>(wrote);
  }
  if (error == 0 && fsync(fd) != 0) error = errno;
  if (close(fd) != 0 && error == 0) error = errno;
  if (error == 0 && std::rename(tmp.c_str(), path.c_str()) != 0) error = errno;
  if (error != 0) {
    unlink(tmp.c_str());
    return absl::UnavailableError(
        absl::StrCat(path, ": write failed: ", std::strerror(error)));
  }
  return absl::OkStatus();
}

}  // namespace vdm
