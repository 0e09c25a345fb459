// libFuzzer target: the IDX reader, vdm::ReadIdx and vdm::ReadIdxImages
// (model/vdm/image_io.h). Run by scripts/fuzz.sh.
//
// The readers take a path, so each input is written to an in-memory file
// (memfd) and read back through /proc/self/fd/N: no disk traffic, nothing to
// clean up. An input is read as it is (a plain IDX file, or a gzip file when
// the seed was one) or, when it is not gzip already and its size says so,
// gzip-compressed here, so that arbitrary IDX contents also reach the reader
// inside a valid gzip stream (a mutated .gz file mostly fails its CRC).
// A file whose header declares 3 dimensions goes to ReadIdxImages, any other
// to ReadIdx (ReadIdxImages reads through ReadIdx).
//
// Checks, when the fuzzer knows the uncompressed bytes: what a successful
// read returns is exactly the header's dimensions and the bytes after the
// header (images: consecutive HxW slices, N or `limit` of them).
#include <sys/mman.h>
#include <unistd.h>
#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "model/vdm/image_io.h"

namespace {

int g_fd = -1;
std::string g_path;

void WriteInput(const std::string& bytes) {
  if (ftruncate(g_fd, 0) != 0) std::abort();
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = pwrite(g_fd, bytes.data() + done, bytes.size() - done,
                             static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
}

bool IsGzip(const std::string& bytes) {
  return bytes.size() >= 2 && static_cast<uint8_t>(bytes[0]) == 0x1f &&
         static_cast<uint8_t>(bytes[1]) == 0x8b;
}

std::string Gzip(const std::string& in) {
  z_stream z{};
  // windowBits 15 + 16: a gzip wrapper.
  if (deflateInit2(&z, Z_BEST_SPEED, Z_DEFLATED, 15 + 16, 8,
                   Z_DEFAULT_STRATEGY) != Z_OK) {
    std::abort();
  }
  std::string out(deflateBound(&z, in.size()) + 32, '\0');
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  z.next_out = reinterpret_cast<Bytef*>(out.data());
  z.avail_out = static_cast<uInt>(out.size());
  if (deflate(&z, Z_FINISH) != Z_STREAM_END) std::abort();
  out.resize(z.total_out);
  deflateEnd(&z);
  return out;
}

// The contents of a gzip file that is exactly one clean gzip member of at
// most 16 MiB; nullopt when it is anything else (then only "no crash" is
// checked: gzread's handling of odd files is zlib's business).
std::optional<std::string> Gunzip(const std::string& in) {
  z_stream z{};
  if (inflateInit2(&z, 15 + 16) != Z_OK) std::abort();
  std::string out;
  z.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(in.data()));
  z.avail_in = static_cast<uInt>(in.size());
  int rc = Z_OK;
  char buffer[1 << 14];
  while (rc == Z_OK && out.size() <= (size_t{16} << 20)) {
    z.next_out = reinterpret_cast<Bytef*>(buffer);
    z.avail_out = sizeof(buffer);
    rc = inflate(&z, Z_NO_FLUSH);
    out.append(buffer, sizeof(buffer) - z.avail_out);
    if (rc == Z_BUF_ERROR && z.avail_in == 0) break;
  }
  const bool clean = rc == Z_STREAM_END && z.avail_in == 0;
  inflateEnd(&z);
  if (!clean) return std::nullopt;
  return out;
}

uint32_t Be32(const std::string& s, size_t at) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data() + at);
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// Reads `file` (whose uncompressed contents are `plain` when known) and
// checks the result against the header.
void ReadBack(const std::string& file, const std::optional<std::string>& plain,
              int64_t limit) {
  WriteInput(file);
  const int ndims =
      plain && plain->size() >= 4 ? static_cast<uint8_t>((*plain)[3]) : -1;
  const size_t header = 4 + 4 * static_cast<size_t>(ndims < 0 ? 0 : ndims);
  std::vector<int64_t> dims;
  if (plain && plain->size() >= header) {
    for (int i = 0; i < ndims; ++i) dims.push_back(Be32(*plain, 4 + 4 * i));
  }
  if (ndims == 3 || !plain) {
    absl::StatusOr<std::vector<vdm::Image8>> images =
        vdm::ReadIdxImages(g_path, limit);
    if (!images.ok() || !plain) return;
    if (dims.size() != 3) std::abort();  // accepted a truncated header
    const int64_t n = dims[0];
    const int64_t want = limit > 0 && limit < n ? limit : n;
    if (static_cast<int64_t>(images->size()) != want) std::abort();
    const size_t slice = static_cast<size_t>(dims[1] * dims[2]);
    for (size_t i = 0; i < images->size(); ++i) {
      const vdm::Image8& image = (*images)[i];
      if (image.channels != 1 || image.height != dims[1] ||
          image.width != dims[2] || image.pixels.size() != slice ||
          plain->size() < header + (i + 1) * slice ||
          (slice > 0 &&
           std::memcmp(image.pixels.data(), plain->data() + header + i * slice,
                       slice) != 0)) {
        std::abort();
      }
    }
    return;
  }
  absl::StatusOr<vdm::IdxArray> array = vdm::ReadIdx(g_path);
  if (!array.ok()) return;
  if (array->dims != dims) std::abort();
  size_t total = 1;
  for (const int64_t dim : dims) total *= static_cast<size_t>(dim);
  if (array->data.size() != total || plain->size() < header + total ||
      (total > 0 &&
       std::memcmp(array->data.data(), plain->data() + header, total) != 0)) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_fd = memfd_create("idx_fuzzer_input", MFD_CLOEXEC);
  if (g_fd < 0) {
    std::perror("memfd_create");
    std::abort();
  }
  g_path = "/proc/self/fd/" + std::to_string(g_fd);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  // One read per input (a read whose header declares a large array costs a
  // 16 MiB buffer, so reads are the expensive part): the low bits of the
  // size pick `limit` and, for a plain input, whether it is read as it is or
  // gzip-compressed.
  const int64_t limit = size % 2;  // 0 (all images) or 1
  if (IsGzip(input)) {
    ReadBack(input, Gunzip(input), limit);
  } else if (size % 4 < 2) {
    ReadBack(input, input, limit);
  } else {
    ReadBack(Gzip(input), input, limit);
  }
  return 0;
}
