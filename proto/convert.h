// Conversions between the vdm.v1 messages and the library's plain types,
// shared by the server and the client so that each exists once: images on
// the wire (PNG or raw) <-> Image8, and the Sampler / TimeGrid enums <->
// the library's table in model/vdm/sampler_config.h (enum SAMPLER_X is the
// library's sampler "x"). Stateless and thread-safe; free of torch.
#ifndef VDM_PROTO_CONVERT_H_
#define VDM_PROTO_CONVERT_H_

#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/image.h"
#include "model/vdm/image_scores.h"
#include "model/vdm/request.h"
#include "model/vdm/sampler_config.h"
#include "vdm/v1/vdm.pb.h"

namespace vdm {

// UNSPECIFIED is the default (DDIM, uniform t); an unknown number is
// INVALID_ARGUMENT naming the field.
absl::StatusOr<SamplerType> SamplerFromProto(v1::Sampler sampler);
v1::Sampler SamplerToProto(SamplerType type);
absl::StatusOr<TimeGrid> TimeGridFromProto(v1::TimeGrid grid);
v1::TimeGrid TimeGridToProto(TimeGrid grid);

// UNSPECIFIED is ELBO; an unknown number is INVALID_ARGUMENT naming "method".
absl::StatusOr<ScoreMethod> ScoreMethodFromProto(v1::ScoreMethod method);
v1::ScoreMethod ScoreMethodToProto(ScoreMethod method);

// Whether `format` is a known ImageFormat value (UNSPECIFIED = PNG).
bool IsKnownFormat(v1::ImageFormat format);

// Writes `image` as PNG or raw bytes with its shape fields set.
absl::Status ImageToProto(const Image8& image, v1::ImageFormat format,
                          v1::Image* out);

// Decodes a wire image. Without `expect`, a raw image needs its shape
// fields and a PNG keeps its own channels. With `expect` (a model's shape),
// a raw image must have expect's size and no contradicting shape fields, a
// PNG goes through DecodePngAs (its header must match: size, no alpha, no
// color for a gray model; refused before any allocation); errors say what
// was found and what the model expects.
absl::StatusOr<Image8> ImageFromProto(const v1::Image& image,
                                      v1::ImageFormat format,
                                      const ImageShape* expect = nullptr);

// A latent (C x H x W floats) on the wire, with its shape fields set.
// A per-image score record (model/vdm/image_scores.h) and its anomaly
// fields (anomaly.h ScoreAnomalies) as the wire's ImageScore: an ODE score
// (ode_function_evaluations > 0) carries bpd and the ODE fields only; an
// ELBO score its parts, complexity, bands, the anomaly fields and, with a
// background model, background_bpd. The anomaly map (pixel_bits) is the
// service's (it also encodes the PNG).
void ScoreToProto(const ImageBpd& score, const ImageAnomaly& anomaly,
                  v1::ImageScore* out);

void LatentToProto(const std::vector<float>& values, const ImageShape& shape,
                   v1::Latent* out);
// A wire latent of `expect`'s shape: its shape fields (when set) must be
// expect's, it must have exactly expect.dims() values, all finite.
absl::StatusOr<std::vector<float>> LatentFromProto(const v1::Latent& latent,
                                                   const ImageShape& expect);

}  // namespace vdm

#endif  // VDM_PROTO_CONVERT_H_
