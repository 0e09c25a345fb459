// libFuzzer target: vdm::DecodePng (model/vdm/image_io.h) on arbitrary bytes,
// with each of want_channels 0, 1 and 3. Run by scripts/fuzz.sh.
//
// Checks beyond "no crash, no sanitizer report": a decoded image is
// consistent (1 or 3 channels as asked, positive size, channels*height*width
// pixel bytes), and a small one survives EncodePng -> DecodePng unchanged.
//
// A custom mutator repairs the chunk CRCs after most mutations: libpng
// rejects a chunk with a wrong CRC, so without it almost every mutant would
// stop at the first chunk and the decoder behind it would go unexplored.
#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "model/vdm/image_io.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {

uint32_t LoadBe32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

void StoreBe32(uint32_t v, uint8_t* p) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}

// Rewrites the CRC of every complete chunk after the 8-byte signature.
void FixChunkCrcs(uint8_t* data, size_t size) {
  size_t pos = 8;
  while (pos + 12 <= size) {
    const uint32_t length = LoadBe32(data + pos);
    if (length > size - pos - 12) break;
    const uint8_t* type_and_data = data + pos + 4;
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), type_and_data, length + 4);
    StoreBe32(static_cast<uint32_t>(crc), data + pos + 8 + length);
    pos += 12 + static_cast<size_t>(length);
  }
}

void Check(const vdm::Image8& image, int want_channels) {
  const bool channels_ok = want_channels == 0
                               ? image.channels == 1 || image.channels == 3
                               : image.channels == want_channels;
  if (!channels_ok || image.height <= 0 || image.width <= 0 ||
      image.pixels.size() !=
          static_cast<size_t>(image.channels) * image.height * image.width) {
    std::abort();  // an inconsistent image reported as a success
  }
}

}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size,
                                          size_t max_size, unsigned int seed) {
  size = LLVMFuzzerMutate(data, size, max_size);
  // One mutant in four keeps its (probably wrong) CRCs, so the CRC error
  // paths stay covered too.
  if (seed % 4 != 0 && size > 8) {
    static const uint8_t kSignature[8] = {0x89, 'P',  'N',  'G',
                                          '\r', '\n', 0x1a, '\n'};
    std::memcpy(data, kSignature, 8);
    FixChunkCrcs(data, size);
  }
  return size;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string png(reinterpret_cast<const char*>(data), size);
  for (const int want : {0, 1, 3}) {
    absl::StatusOr<vdm::Image8> image = vdm::DecodePng(png, want);
    if (!image.ok()) continue;
    Check(*image, want);
    if (want != 0 || image->pixels.size() > (size_t{1} << 16)) continue;
    // Round trip: the decoded 8-bit gray or RGB image is what EncodePng
    // writes, so it must come back byte for byte.
    absl::StatusOr<std::string> encoded = vdm::EncodePng(*image);
    if (!encoded.ok()) std::abort();
    absl::StatusOr<vdm::Image8> again = vdm::DecodePng(*encoded, 0);
    if (!again.ok() || again->shape() != image->shape() ||
        again->pixels != image->pixels) {
      std::abort();
    }
  }
  return 0;
}
