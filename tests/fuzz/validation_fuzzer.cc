// libFuzzer target: request validation on arbitrary bytes. Run by
// scripts/fuzz.sh.
//
// Each input is parsed (protobuf ParseFromArray) as a vdm.v1.SampleRequest,
// a vdm.v1.ScoreRequest, a vdm.v1.EncodeRequest and a vdm.v1.Image; what
// parses goes through vdm::ToSampleJob / ToScoreJob / ToEncodeJob
// (server/validation.h) for a 1x28x28
// model with 10 classes under the default RequestLimits, and the image
// through vdm::ImageFromProto (proto/convert.h) in every format, with and
// without an expected shape.
//
// Checks: an accepted request is inside the limits it was checked against
// and an accepted image has the shape asked for and the bytes for it.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "model/vdm/image.h"
#include "proto/convert.h"
#include "server/validation.h"
#include "vdm/v1/vdm.pb.h"

namespace {

const vdm::ModelDescription& Model() {
  static const vdm::ModelDescription* model = [] {
    auto* m = new vdm::ModelDescription;
    m->shape = {1, 28, 28};
    m->num_classes = 10;
    m->prediction = "eps";
    return m;
  }();
  return *model;
}

void CheckImage(const vdm::Image8& image, const vdm::ImageShape* expect) {
  if (image.channels <= 0 || image.height <= 0 || image.width <= 0 ||
      static_cast<int64_t>(image.pixels.size()) != image.shape().dims()) {
    std::abort();
  }
  if (expect != nullptr && image.shape() != *expect) std::abort();
}

void FuzzSample(const uint8_t* data, size_t size,
                const vdm::RequestLimits& limits) {
  vdm::v1::SampleRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return;
  absl::StatusOr<vdm::SampleJob> job =
      vdm::ToSampleJob(request, limits, Model());
  if (!job.ok()) return;
  if (job->num_images < 1 || job->num_images > limits.max_images_per_request ||
      job->sampler.steps < 1 || job->sampler.steps > limits.max_steps ||
      !(job->sampler.eta >= 0.0f && job->sampler.eta <= 1.0f) ||
      job->conditioning.label < -1 ||
      job->conditioning.label >= Model().num_classes ||
      job->sampler.resample_rounds < 0 || job->sampler.resample_rounds > 10 ||
      (job->sampler.resample_rounds > 0 && job->known.empty())) {
    std::abort();
  }
  if (!job->latents.empty()) {
    if (static_cast<int>(job->latents.size()) != job->num_images ||
        job->sampler.type != vdm::SamplerType::kDdim || job->sampler.eta != 0) {
      std::abort();
    }
    for (const std::vector<float>& z : job->latents) {
      if (static_cast<int64_t>(z.size()) != Model().shape.dims()) std::abort();
      for (float v : z) {
        if (!std::isfinite(v)) std::abort();
      }
    }
  }
}

void FuzzEncode(const uint8_t* data, size_t size,
                const vdm::RequestLimits& limits) {
  vdm::v1::EncodeRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return;
  absl::StatusOr<vdm::EncodeJob> job =
      vdm::ToEncodeJob(request, limits, Model());
  if (!job.ok()) return;
  if (job->images.empty() ||
      static_cast<int>(job->images.size()) > limits.max_images_per_request ||
      job->sampler.steps < 1 || job->sampler.steps > limits.max_steps ||
      job->label < -1 || job->label >= Model().num_classes) {
    std::abort();
  }
  for (const vdm::Image8& image : job->images) CheckImage(image, &Model().shape);
}

void FuzzScore(const uint8_t* data, size_t size,
               const vdm::RequestLimits& limits) {
  vdm::v1::ScoreRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return;
  absl::StatusOr<vdm::ScoreJob> job = vdm::ToScoreJob(request, limits, Model());
  if (job.ok()) {
    if (job->images.size() != static_cast<size_t>(request.images_size()) ||
        job->images.empty() ||
        static_cast<int>(job->images.size()) > limits.max_images_per_request ||
        job->timesteps < 2 || job->timesteps > limits.max_timesteps ||
        job->label < -1 || job->label >= Model().num_classes) {
      std::abort();
    }
    for (const vdm::Image8& image : job->images) {
      CheckImage(image, &Model().shape);
    }
  }
  // The client decodes the images of an answer without an expected shape.
  for (const vdm::v1::Image& image : request.images()) {
    absl::StatusOr<vdm::Image8> decoded =
        vdm::ImageFromProto(image, request.format(), nullptr);
    if (decoded.ok()) CheckImage(*decoded, nullptr);
  }
}

void FuzzImage(const uint8_t* data, size_t size) {
  vdm::v1::Image image;
  if (!image.ParseFromArray(data, static_cast<int>(size))) return;
  static const vdm::ImageShape kGray{1, 28, 28};
  static const vdm::ImageShape kRgb{3, 8, 8};
  for (const vdm::v1::ImageFormat format :
       {vdm::v1::IMAGE_FORMAT_UNSPECIFIED, vdm::v1::IMAGE_FORMAT_PNG,
        vdm::v1::IMAGE_FORMAT_RAW}) {
    for (const vdm::ImageShape* expect :
         {static_cast<const vdm::ImageShape*>(nullptr), &kGray, &kRgb}) {
      absl::StatusOr<vdm::Image8> decoded =
          vdm::ImageFromProto(image, format, expect);
      if (decoded.ok()) CheckImage(*decoded, expect);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const vdm::RequestLimits kLimits;
  FuzzSample(data, size, kLimits);
  FuzzScore(data, size, kLimits);
  FuzzEncode(data, size, kLimits);
  FuzzImage(data, size);
  return 0;
}
