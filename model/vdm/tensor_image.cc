#include "model/vdm/tensor_image.h"

#include <ATen/ATen.h>

#include <cstring>

#include "absl/strings/str_format.h"

namespace vdm {

std::vector<Image8> ToImages(const at::Tensor& pixels_uint8) {
  const at::Tensor pixels =
      pixels_uint8.to(at::kCPU).to(at::kByte).contiguous();
  std::vector<Image8> images;
  if (pixels.dim() != 4) return images;
  const int64_t per_image =
      pixels.size(0) > 0 ? pixels.numel() / pixels.size(0) : 0;
  const uint8_t* data = pixels.data_ptr<uint8_t>();
  images.reserve(pixels.size(0));
  for (int64_t i = 0; i < pixels.size(0); ++i) {
    Image8 image{static_cast<int>(pixels.size(1)),
                 static_cast<int>(pixels.size(2)),
                 static_cast<int>(pixels.size(3)), {}};
    image.pixels.assign(data + i * per_image, data + (i + 1) * per_image);
    images.push_back(std::move(image));
  }
  return images;
}

absl::StatusOr<at::Tensor> ToTensor(const std::vector<Image8>& images,
                                    const ImageShape& shape) {
  const int64_t n = static_cast<int64_t>(images.size());
  at::Tensor x = at::empty({n, shape.channels, shape.height, shape.width},
                           at::kByte);
  uint8_t* data = x.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    const Image8& image = images[i];
    if (image.shape() != shape ||
        static_cast<int64_t>(image.pixels.size()) != shape.dims()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "image %d is %dx%dx%d with %d bytes, expected %dx%dx%d", i,
          image.channels, image.height, image.width, image.pixels.size(),
          shape.channels, shape.height, shape.width));
    }
    std::memcpy(data + i * shape.dims(), image.pixels.data(), shape.dims());
  }
  return x;
}

}  // namespace vdm
