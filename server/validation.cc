#include "server/validation.h"

#include <random>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/vdm/request.h"
#include "model/vdm/status_macros.h"
#include "proto/convert.h"

namespace vdm {
namespace {

constexpr int kDefaultSteps = 50;
constexpr int kDefaultTimesteps = 16;
constexpr float kMaxGuidance = 20.0f;

absl::Status Invalid(const std::string& message) {
  return absl::InvalidArgumentError(message);
}

uint64_t PickSeed(bool has_seed, uint64_t seed) {
  if (has_seed) return seed;
  std::random_device rd;
  return (uint64_t{rd()} << 32) ^ rd();
}

absl::StatusOr<int> CheckLabel(const ModelDescription& model, bool has_label,
                               int label) {
  if (!has_label) return -1;
  if (model.num_classes == 0) {
    return Invalid("label: the served model is unconditional (num_classes = 0);"
                   " leave label unset");
  }
  if (label < 0 || label >= model.num_classes) {
    return Invalid(absl::StrFormat("label: %d is out of range [0, %d)", label,
                                   model.num_classes));
  }
  return label;
}

}  // namespace

absl::StatusOr<SampleJob> ToSampleJob(const v1::SampleRequest& r,
                                      const RequestLimits& limits,
                                      const ModelDescription& model) {
  SampleJob job;
  if (r.num_images() < 1 || r.num_images() > limits.max_images_per_request) {
    return Invalid(absl::StrFormat("num_images: %d is out of range [1, %d]",
                                   r.num_images(),
                                   limits.max_images_per_request));
  }
  job.num_images = r.num_images();
  VDM_ASSIGN_OR_RETURN(job.sampler.type, SamplerFromProto(r.sampler()));
  VDM_ASSIGN_OR_RETURN(job.sampler.grid, TimeGridFromProto(r.time_grid()));
  job.sampler.steps = r.steps() == 0 ? kDefaultSteps : r.steps();
  if (job.sampler.steps < 1 || job.sampler.steps > limits.max_steps) {
    return Invalid(absl::StrFormat("steps: %d is out of range [1, %d]",
                                   r.steps(), limits.max_steps));
  }
  if (!(r.eta() >= 0.0f && r.eta() <= 1.0f)) {
    return Invalid(absl::StrCat("eta: ", r.eta(), " is out of range [0, 1]"));
  }
  if (r.eta() != 0.0f && job.sampler.type != SamplerType::kDdim) {
    return Invalid(absl::StrCat(
        "eta: ", r.eta(), " applies to the ddim sampler only, not ",
        SamplerName(job.sampler.type),
        " (ddpm is DDIM with eta = 1); leave eta unset"));
  }
  job.sampler.eta = r.eta();
  VDM_ASSIGN_OR_RETURN(job.conditioning.label,
                       CheckLabel(model, r.has_label(), r.label()));
  if (r.has_guidance_scale()) {
    const float g = r.guidance_scale();
    if (!(g >= 0.0f && g <= kMaxGuidance)) {
      return Invalid(absl::StrCat("guidance_scale: ", g,
                                  " is out of range [0, ", kMaxGuidance, "]"));
    }
    if (job.conditioning.label < 0 && g != 1.0f) {
      return Invalid("guidance_scale: classifier-free guidance needs a label");
    }
    job.conditioning.guidance_scale = g;
  }
  if (!IsKnownFormat(r.format())) {
    return Invalid(absl::StrCat("format: unknown value ", r.format()));
  }
  const int64_t rows = SampleRowCost(job.sampler, job.num_images,
                                     job.conditioning, model.num_classes);
  if (rows > limits.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d network evaluations%s = %d rows, "
        "more than this server admits for one request (%d, "
        "--max_queued_rows); ask for fewer images or steps",
        job.num_images, SamplerEvaluations(job.sampler),
        IsGuided(job.conditioning, model.num_classes) ? " x 2 (guidance)" : "",
        rows, limits.max_request_rows));
  }
  job.seed = PickSeed(r.has_seed(), r.seed());
  return job;
}

absl::StatusOr<ScoreJob> ToScoreJob(const v1::ScoreRequest& r,
                                    const RequestLimits& limits,
                                    const ModelDescription& model) {
  ScoreJob job;
  const int n = r.images_size();
  if (n < 1 || n > limits.max_images_per_request) {
    return Invalid(absl::StrFormat("images: %d images, allowed [1, %d]", n,
                                   limits.max_images_per_request));
  }
  if (!IsKnownFormat(r.format())) {
    return Invalid(absl::StrCat("format: unknown value ", r.format()));
  }
  job.timesteps = r.timesteps() == 0 ? kDefaultTimesteps : r.timesteps();
  if (job.timesteps < 2 || job.timesteps > limits.max_timesteps) {
    return Invalid(absl::StrFormat("timesteps: %d is out of range [2, %d]",
                                   r.timesteps(), limits.max_timesteps));
  }
  VDM_ASSIGN_OR_RETURN(job.label, CheckLabel(model, r.has_label(), r.label()));
  const int64_t rows = ScoreRowCost(n, job.timesteps);
  if (rows > limits.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d timesteps = %d rows, more than "
        "this server admits for one request (%d, --max_queued_rows); send "
        "fewer images per call",
        n, job.timesteps, rows, limits.max_request_rows));
  }
  for (int i = 0; i < n; ++i) {
    absl::StatusOr<Image8> image =
        ImageFromProto(r.images(i), r.format(), &model.shape);
    if (!image.ok()) {
      return Invalid(absl::StrCat("images[", i, "]: ", image.status().message()));
    }
    job.images.push_back(*std::move(image));
  }
  job.seed = PickSeed(r.has_seed(), r.seed());
  job.shared_noise = r.shared_noise();
  return job;
}

}  // namespace vdm
