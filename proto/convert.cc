#include "proto/convert.h"

#include <cmath>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/vdm/image_io.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

constexpr char kSamplerPrefix[] = "SAMPLER_";
constexpr char kGridPrefix[] = "TIME_GRID_";

// "SAMPLER_EULER_MARUYAMA" -> "euler_maruyama" (empty when the prefix is
// missing, i.e. an unknown enum number).
std::string LibraryName(const std::string& enum_name, const char* prefix) {
  if (!absl::StartsWith(enum_name, prefix)) return "";
  return absl::AsciiStrToLower(enum_name.substr(std::string(prefix).size()));
}

std::string ShapeText(const ImageShape& s) {
  return absl::StrFormat("%dx%dx%d (CxHxW)", s.channels, s.height, s.width);
}

}  // namespace

absl::StatusOr<SamplerType> SamplerFromProto(v1::Sampler sampler) {
  if (sampler == v1::SAMPLER_UNSPECIFIED) return SamplerType::kDdim;
  const std::string name = LibraryName(v1::Sampler_Name(sampler), kSamplerPrefix);
  absl::StatusOr<SamplerType> type = ParseSamplerType(name);
  if (name.empty() || !type.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampler: unknown value ", static_cast<int>(sampler),
        "; see enum vdm.v1.Sampler"));
  }
  return type;
}

v1::Sampler SamplerToProto(SamplerType type) {
  v1::Sampler out = v1::SAMPLER_UNSPECIFIED;
  v1::Sampler_Parse(absl::StrCat(kSamplerPrefix,
                                 absl::AsciiStrToUpper(SamplerName(type))),
                    &out);
  return out;
}

absl::StatusOr<TimeGrid> TimeGridFromProto(v1::TimeGrid grid) {
  if (grid == v1::TIME_GRID_UNSPECIFIED) return TimeGrid::kUniformT;
  const std::string name = LibraryName(v1::TimeGrid_Name(grid), kGridPrefix);
  absl::StatusOr<TimeGrid> parsed = ParseTimeGrid(name);
  if (name.empty() || !parsed.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "time_grid: unknown value ", static_cast<int>(grid),
        "; see enum vdm.v1.TimeGrid"));
  }
  return parsed;
}

v1::TimeGrid TimeGridToProto(TimeGrid grid) {
  v1::TimeGrid out = v1::TIME_GRID_UNSPECIFIED;
  v1::TimeGrid_Parse(
      absl::StrCat(kGridPrefix, absl::AsciiStrToUpper(TimeGridName(grid))),
      &out);
  return out;
}

absl::StatusOr<ScoreMethod> ScoreMethodFromProto(v1::ScoreMethod method) {
  switch (method) {
    case v1::SCORE_METHOD_UNSPECIFIED:
    case v1::SCORE_METHOD_ELBO:
      return ScoreMethod::kElbo;
    case v1::SCORE_METHOD_ODE:
      return ScoreMethod::kOde;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "method: unknown value ", static_cast<int>(method),
          "; see enum vdm.v1.ScoreMethod"));
  }
}

v1::ScoreMethod ScoreMethodToProto(ScoreMethod method) {
  return method == ScoreMethod::kOde ? v1::SCORE_METHOD_ODE
                                     : v1::SCORE_METHOD_ELBO;
}

bool IsKnownFormat(v1::ImageFormat f) {
  return f == v1::IMAGE_FORMAT_UNSPECIFIED || f == v1::IMAGE_FORMAT_PNG ||
         f == v1::IMAGE_FORMAT_RAW;
}

absl::Status ImageToProto(const Image8& image, v1::ImageFormat format,
                          v1::Image* out) {
  out->set_channels(image.channels);
  out->set_height(image.height);
  out->set_width(image.width);
  if (format == v1::IMAGE_FORMAT_RAW) {
    out->set_data(image.pixels.data(), image.pixels.size());
    return absl::OkStatus();
  }
  VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(image));
  out->set_data(std::move(png));
  return absl::OkStatus();
}

absl::StatusOr<Image8> ImageFromProto(const v1::Image& image,
                                      v1::ImageFormat format,
                                      const ImageShape* expect) {
  Image8 out;
  const ImageShape fields{image.channels(), image.height(), image.width()};
  const bool has_fields =
      fields.channels != 0 || fields.height != 0 || fields.width != 0;
  if (format == v1::IMAGE_FORMAT_RAW) {
    if (expect != nullptr) {
      if (has_fields && fields != *expect) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "raw image says it is %dx%dx%d, the model expects %s",
            fields.channels, fields.height, fields.width, ShapeText(*expect)));
      }
      if (static_cast<int64_t>(image.data().size()) != expect->dims()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "raw data has %d bytes, the model expects %d (%s)",
            image.data().size(), expect->dims(), ShapeText(*expect)));
      }
      out.channels = expect->channels;
      out.height = expect->height;
      out.width = expect->width;
    } else {
      // Bounded first, so the product cannot overflow.
      constexpr int kMaxSide = 1 << 16;
      if (fields.channels <= 0 || fields.height <= 0 || fields.width <= 0 ||
          fields.channels > 4 || fields.height > kMaxSide ||
          fields.width > kMaxSide ||
          static_cast<int64_t>(image.data().size()) != fields.dims()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "raw image of shape %dx%dx%d has %d bytes", fields.channels,
            fields.height, fields.width, image.data().size()));
      }
      out.channels = fields.channels;
      out.height = fields.height;
      out.width = fields.width;
    }
    out.pixels.assign(image.data().begin(), image.data().end());
    return out;
  }
  absl::StatusOr<Image8> decoded = expect != nullptr
                                       ? DecodePngAs(image.data(), *expect)
                                       : DecodePng(image.data());
  if (!decoded.ok()) {
    if (expect != nullptr) return decoded.status();  // says what it found
    return absl::InvalidArgumentError(
        absl::StrCat("not a valid PNG: ", decoded.status().message()));
  }
  if (expect != nullptr && decoded->shape() != *expect) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "image is %dx%dx%d, the model expects %s", decoded->channels,
        decoded->height, decoded->width, ShapeText(*expect)));
  }
  return decoded;
}

void ScoreToProto(const ImageBpd& s, const ImageAnomaly& a,
                  v1::ImageScore* out) {
  out->set_bpd(s.bpd);
  if (s.ode_function_evaluations > 0) {  // no ELBO parts, no anomaly features
    out->set_ode_function_evaluations(s.ode_function_evaluations);
    if (s.ode_stderr_bpd) out->set_ode_stderr_bpd(*s.ode_stderr_bpd);
    if (s.ode_error_bpd) out->set_ode_error_bpd(*s.ode_error_bpd);
    return;
  }
  out->set_prior_bpd(s.prior);
  out->set_recon_bpd(s.recon);
  out->set_diffusion_bpd(s.diffusion);
  out->set_stderr_bpd(s.stderr_bpd);
  out->set_complexity_bpd(s.complexity);
  for (double b : s.band) out->add_band_bpd(b);
  if (s.background_bpd) out->set_background_bpd(*s.background_bpd);
  if (a.llr) out->set_llr(*a.llr);
  if (a.feature_distance) out->set_feature_distance(*a.feature_distance);
  if (a.local_distance) out->set_local_distance(*a.local_distance);
  if (a.reconstruction_error) {
    out->set_reconstruction_error(*a.reconstruction_error);
  }
  if (a.anomaly_score) out->set_anomaly_score(*a.anomaly_score);
  if (a.p_value) out->set_p_value(*a.p_value);
  if (a.is_anomaly) out->set_is_anomaly(*a.is_anomaly);
}

void LatentToProto(const std::vector<float>& values, const ImageShape& shape,
                   v1::Latent* out) {
  out->set_channels(shape.channels);
  out->set_height(shape.height);
  out->set_width(shape.width);
  out->mutable_values()->Assign(values.begin(), values.end());
}

absl::StatusOr<std::vector<float>> LatentFromProto(const v1::Latent& latent,
                                                   const ImageShape& expect) {
  const bool shaped =
      latent.channels() != 0 || latent.height() != 0 || latent.width() != 0;
  if (shaped && (latent.channels() != expect.channels ||
                 latent.height() != expect.height ||
                 latent.width() != expect.width)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "shape %dx%dx%d (CxHxW) does not match the model's %s",
        latent.channels(), latent.height(), latent.width(), ShapeText(expect)));
  }
  if (latent.values_size() != expect.dims()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%d values, the model's latents have %d (%s)", latent.values_size(),
        expect.dims(), ShapeText(expect)));
  }
  for (int i = 0; i < latent.values_size(); ++i) {
    if (!std::isfinite(latent.values(i))) {
      return absl::InvalidArgumentError(
          absl::StrFormat("value %d is not finite", i));
    }
  }
  return std::vector<float>(latent.values().begin(), latent.values().end());
}

}  // namespace vdm
