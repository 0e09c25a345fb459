// The two image types every layer shares, free of torch and gRPC: the shape
// a model works on and an 8-bit image. See docs/design.md ("Layers").
#ifndef VDM_MODEL_VDM_IMAGE_H_
#define VDM_MODEL_VDM_IMAGE_H_

#include <cstdint>
#include <vector>

namespace vdm {

// Channels x height x width of a model's images.
struct ImageShape {
  int channels = 0;
  int height = 0;
  int width = 0;
  int64_t dims() const { return int64_t{channels} * height * width; }
  bool operator==(const ImageShape& o) const {
    return channels == o.channels && height == o.height && width == o.width;
  }
  bool operator!=(const ImageShape& o) const { return !(*this == o); }
};

// An 8-bit image in planar CHW order (channel planes, then rows).
struct Image8 {
  int channels = 0;
  int height = 0;
  int width = 0;
  std::vector<uint8_t> pixels;  // channels * height * width bytes
  ImageShape shape() const { return {channels, height, width}; }
};

}  // namespace vdm

#endif  // VDM_MODEL_VDM_IMAGE_H_
