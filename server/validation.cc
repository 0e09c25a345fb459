#include "server/validation.h"

#include <algorithm>
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
constexpr int kMaxResampleRounds = 10;

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

// An input image in either wire format: PNG when it has the PNG signature,
// else raw bytes of `shape`.
absl::StatusOr<Image8> InputImage(const v1::Image& image,
                                  const ImageShape& shape) {
  const bool png = image.data().size() >= 8 &&
                   image.data().compare(0, 8, "\x89PNG\r\n\x1a\n", 8) == 0;
  return ImageFromProto(image, png ? v1::IMAGE_FORMAT_PNG : v1::IMAGE_FORMAT_RAW,
                        &shape);
}

// init_image, strength and mask.
absl::Status CheckEdit(const v1::SampleRequest& r,
                       const ModelDescription& model, SampleJob& job) {
  const bool has_image = r.has_init_image() && !r.init_image().data().empty();
  const bool has_mask = r.has_mask() && !r.mask().data().empty();
  if (r.has_strength() && r.has_strength_t()) {
    return Invalid(
        "strength_t: give either strength (noise variance fraction) or "
        "strength_t (time), not both");
  }
  // Whichever of the two is set, by its own name.
  const bool has_strength = r.has_strength() || r.has_strength_t();
  const char* name = r.has_strength_t() ? "strength_t" : "strength";
  const float strength = r.has_strength_t() ? r.strength_t() : r.strength();
  if (has_strength && !(strength > 0.0f && strength <= 1.0f)) {
    return Invalid(
        absl::StrCat(name, ": ", strength, " is out of range (0, 1]"));
  }
  if (!has_image) {
    if (has_strength) return Invalid(absl::StrCat(name, ": needs an init_image"));
    if (has_mask) return Invalid("mask: needs an init_image");
    return absl::OkStatus();
  }
  if (!has_mask && (!has_strength || strength == 1.0f)) {
    return Invalid(
        "init_image: give a strength < 1 (image-to-image) or a mask "
        "(inpainting)");
  }
  absl::StatusOr<Image8> image = InputImage(r.init_image(), model.shape);
  if (!image.ok()) {
    return Invalid(absl::StrCat("init_image: ", image.status().message()));
  }
  job.reference = *std::move(image);
  job.strength = has_strength ? strength : 1.0;
  job.strength_is_time = r.has_strength_t();
  if (has_mask) {
    const ImageShape gray{1, model.shape.height, model.shape.width};
    absl::StatusOr<Image8> mask = InputImage(r.mask(), gray);
    if (!mask.ok()) {
      return Invalid(absl::StrCat("mask: ", mask.status().message(),
                                  " (a gray image, white = known)"));
    }
    job.known.resize(mask->pixels.size());
    for (size_t i = 0; i < mask->pixels.size(); ++i) {
      job.known[i] = mask->pixels[i] >= 128 ? 1 : 0;
    }
  }
  return absl::OkStatus();
}

// How many images: num_images, or one per latent when decoding (0 or the
// same count in num_images).
absl::StatusOr<int> CheckImageCount(const v1::SampleRequest& r,
                                    const RequestLimits& limits) {
  const int latents = r.latents_size();
  if (latents == 0) {
    if (r.num_images() < 1 || r.num_images() > limits.max_images_per_request) {
      return Invalid(absl::StrFormat("num_images: %d is out of range [1, %d]",
                                     r.num_images(),
                                     limits.max_images_per_request));
    }
    return r.num_images();
  }
  if (r.num_images() != 0 && r.num_images() != latents) {
    return Invalid(absl::StrFormat(
        "num_images: %d, but %d latents are given; give 0 or %d",
        r.num_images(), latents, latents));
  }
  if (latents > limits.max_images_per_request) {
    return Invalid(absl::StrFormat("latents: %d latents, allowed [1, %d]",
                                   latents, limits.max_images_per_request));
  }
  return latents;
}

// sampler, time_grid, steps and eta (which samplers take eta: the sampler
// table, sampler_config.h); decoding latents needs deterministic DDIM.
absl::StatusOr<SamplerConfig> CheckSampler(const v1::SampleRequest& r,
                                           const RequestLimits& limits) {
  SamplerConfig sampler;
  VDM_ASSIGN_OR_RETURN(sampler.type, SamplerFromProto(r.sampler()));
  VDM_ASSIGN_OR_RETURN(sampler.grid, TimeGridFromProto(r.time_grid()));
  sampler.steps = r.steps() == 0 ? kDefaultSteps : r.steps();
  if (sampler.steps < 1 || sampler.steps > limits.max_steps) {
    return Invalid(absl::StrFormat("steps: %d is out of range [1, %d]",
                                   r.steps(), limits.max_steps));
  }
  if (!(r.eta() >= 0.0f && r.eta() <= 1.0f)) {
    return Invalid(absl::StrCat("eta: ", r.eta(), " is out of range [0, 1]"));
  }
  if (r.eta() != 0.0f && !TraitsOf(sampler.type).takes_eta) {
    return Invalid(absl::StrCat(
        "eta: ", r.eta(), " applies only to ",
        SamplerNameList(", ", [](const SamplerTraits& t) { return t.takes_eta; }),
        ", not ", SamplerName(sampler.type), "; leave eta unset"));
  }
  sampler.eta = r.eta();
  if (r.latents_size() > 0 &&
      (sampler.type != SamplerType::kDdim || sampler.eta != 0.0)) {
    return Invalid(absl::StrCat(
        "latents: decoding needs the ddim sampler with eta 0 (the inverse of "
        "Encode), got ", SamplerName(sampler.type), " with eta ", sampler.eta));
  }
  return sampler;
}

// label, negative_label and guidance_scale.
absl::StatusOr<Conditioning> CheckConditioning(const v1::SampleRequest& r,
                                               const ModelDescription& model) {
  Conditioning c;
  VDM_ASSIGN_OR_RETURN(c.label, CheckLabel(model, r.has_label(), r.label()));
  if (r.has_negative_label()) {
    absl::StatusOr<int> negative =
        CheckLabel(model, true, r.negative_label());
    if (!negative.ok()) {
      return Invalid(absl::StrCat("negative_label: ", negative.status().message()));
    }
    if (*negative == c.label) {
      return Invalid("negative_label: must differ from label");
    }
    if (!r.has_guidance_scale() || r.guidance_scale() == 1.0f) {
      return Invalid(
          "guidance_scale: negative_label needs a guidance scale other than 1");
    }
    c.negative_label = *negative;
  }
  if (r.has_guidance_scale()) {
    const float g = r.guidance_scale();
    if (!(g >= 0.0f && g <= kMaxGuidance)) {
      return Invalid(absl::StrCat("guidance_scale: ", g,
                                  " is out of range [0, ", kMaxGuidance, "]"));
    }
    if (c.label < 0 && c.negative_label < 0 && g != 1.0f) {
      return Invalid(
          "guidance_scale: classifier-free guidance needs a label or a "
          "negative_label");
    }
    c.guidance_scale = g;
  }
  return c;
}

// The latents to decode (after CheckEdit: decoding takes no edit).
absl::Status CheckLatents(const v1::SampleRequest& r,
                          const ModelDescription& model, SampleJob& job) {
  if (r.latents_size() == 0) return absl::OkStatus();
  if (job.reference || r.has_strength() || r.has_strength_t()) {
    return Invalid(
        "latents: decoding cannot be combined with init_image, strength, "
        "strength_t or mask");
  }
  for (int i = 0; i < r.latents_size(); ++i) {
    absl::StatusOr<std::vector<float>> z =
        LatentFromProto(r.latents(i), model.shape);
    if (!z.ok()) {
      return Invalid(absl::StrCat("latents[", i, "]: ", z.status().message()));
    }
    job.latents.push_back(*std::move(z));
  }
  return absl::OkStatus();
}

// resample_rounds (after CheckEdit: RePaint needs the mask), for a sampler
// that is not multistep in the sampler table.
absl::Status CheckResampling(const v1::SampleRequest& r, SampleJob& job) {
  if (r.resample_rounds() == 0) return absl::OkStatus();
  if (r.resample_rounds() < 0 || r.resample_rounds() > kMaxResampleRounds) {
    return Invalid(absl::StrFormat("resample_rounds: %d is out of range [0, %d]",
                                   r.resample_rounds(), kMaxResampleRounds));
  }
  if (job.known.empty()) {
    return Invalid(
        "resample_rounds: RePaint resampling is for inpainting; needs a mask");
  }
  if (TraitsOf(job.sampler.type).multistep) {
    return Invalid(absl::StrCat(
        "resample_rounds: ", SamplerName(job.sampler.type),
        " keeps a history of steps and cannot resample; use one of ",
        SamplerNameList(", ", [](const SamplerTraits& t) { return !t.multistep; })));
  }
  job.sampler.resample_rounds = r.resample_rounds();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SampleJob> ToSampleJob(const v1::SampleRequest& r,
                                      const RequestLimits& limits,
                                      const ModelDescription& model) {
  SampleJob job;
  VDM_ASSIGN_OR_RETURN(job.num_images, CheckImageCount(r, limits));
  VDM_ASSIGN_OR_RETURN(job.sampler, CheckSampler(r, limits));
  VDM_ASSIGN_OR_RETURN(job.conditioning, CheckConditioning(r, model));
  if (!IsKnownFormat(r.format())) {
    return Invalid(absl::StrCat("format: unknown value ", r.format()));
  }
  VDM_RETURN_IF_ERROR(CheckEdit(r, model, job));
  VDM_RETURN_IF_ERROR(CheckLatents(r, model, job));
  VDM_RETURN_IF_ERROR(CheckResampling(r, job));
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

namespace {

// The image list of an Encode or ScoreBPD request: how many, which format.
absl::Status CheckImageList(int n, v1::ImageFormat format,
                            const RequestLimits& limits) {
  if (n < 1 || n > limits.max_images_per_request) {
    return Invalid(absl::StrFormat("images: %d images, allowed [1, %d]", n,
                                   limits.max_images_per_request));
  }
  if (!IsKnownFormat(format)) {
    return Invalid(absl::StrCat("format: unknown value ", format));
  }
  return absl::OkStatus();
}

// Decodes every image, each of the model's shape; errors name images[i].
absl::StatusOr<std::vector<Image8>> DecodeImages(
    const google::protobuf::RepeatedPtrField<v1::Image>& images,
    v1::ImageFormat format, const ImageShape& shape) {
  std::vector<Image8> out;
  out.reserve(images.size());
  for (int i = 0; i < images.size(); ++i) {
    absl::StatusOr<Image8> image = ImageFromProto(images[i], format, &shape);
    if (!image.ok()) {
      return Invalid(absl::StrCat("images[", i, "]: ", image.status().message()));
    }
    out.push_back(*std::move(image));
  }
  return out;
}

}  // namespace

absl::StatusOr<EncodeJob> ToEncodeJob(const v1::EncodeRequest& r,
                                      const RequestLimits& limits,
                                      const ModelDescription& model) {
  EncodeJob job;
  const int n = r.images_size();
  VDM_RETURN_IF_ERROR(CheckImageList(n, r.format(), limits));
  job.sampler.steps = r.steps() == 0 ? kDefaultSteps : r.steps();
  if (job.sampler.steps < 1 || job.sampler.steps > limits.max_steps) {
    return Invalid(absl::StrFormat("steps: %d is out of range [1, %d]",
                                   r.steps(), limits.max_steps));
  }
  VDM_ASSIGN_OR_RETURN(job.sampler.grid, TimeGridFromProto(r.time_grid()));
  VDM_ASSIGN_OR_RETURN(job.label, CheckLabel(model, r.has_label(), r.label()));
  const int64_t rows = EncodeRowCost(n, job.sampler.steps);
  if (rows > limits.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d steps = %d rows, more than this "
        "server admits for one request (%d, --max_queued_rows); send fewer "
        "images per call",
        n, job.sampler.steps, rows, limits.max_request_rows));
  }
  VDM_ASSIGN_OR_RETURN(job.images,
                       DecodeImages(r.images(), r.format(), model.shape));
  return job;
}

namespace {

// The ODE options of a ScoreBPD request (vdm.proto ScoreRequest): refused,
// naming the field, when set for the ELBO, out of range, or a tolerance of
// the adaptive solver given with RK4's ode_steps.
absl::Status ToOdeOptions(const v1::ScoreRequest& r, ScoreMethod method,
                          OdeOptions* o) {
  const std::pair<bool, const char*> set[] = {
      {r.ode_steps() != 0, "ode_steps"},
      {r.trace_samples() != 0, "trace_samples"},
      {r.ode_rtol() != 0, "ode_rtol"},
      {r.ode_atol() != 0, "ode_atol"},
      {r.ode_max_evaluations() != 0, "ode_max_evaluations"},
      {r.dequantization() != v1::DEQUANTIZATION_UNSPECIFIED, "dequantization"}};
  if (method != ScoreMethod::kOde) {
    for (const auto& [is_set, name] : set) {
      if (is_set) {
        return Invalid(absl::StrCat(
            name, ": only applies with method SCORE_METHOD_ODE"));
      }
    }
    return absl::OkStatus();
  }
  if (r.ode_steps() != 0) {
    o->solver = OdeSolver::kRk4;
    o->steps = r.ode_steps();
    for (int k = 2; k <= 4; ++k) {
      if (set[k].first) {
        return Invalid(absl::StrCat(
            set[k].second, ": applies to the adaptive solver only (ode_steps "
            "0); with ode_steps = ", r.ode_steps(), " the solve is RK4"));
      }
    }
  } else {
    o->solver = OdeSolver::kDormandPrince;
    if (r.ode_rtol() != 0) o->rtol = r.ode_rtol();
    if (r.ode_atol() != 0) o->atol = r.ode_atol();
    if (r.ode_max_evaluations() != 0) {
      o->max_evaluations = r.ode_max_evaluations();
    }
  }
  o->trace_samples = r.trace_samples() == 0 ? 1 : r.trace_samples();
  switch (r.dequantization()) {
    case v1::DEQUANTIZATION_UNSPECIFIED:
    case v1::DEQUANTIZATION_GAUSSIAN:
      o->dequantization = Dequantization::kGaussian;
      break;
    case v1::DEQUANTIZATION_UNIFORM:
      o->dequantization = Dequantization::kUniform;
      break;
    default:
      return Invalid(absl::StrCat("dequantization: unknown value ",
                                  static_cast<int>(r.dequantization()),
                                  "; see enum vdm.v1.Dequantization"));
  }
  const absl::Status checked = CheckOdeOptions(*o);
  if (!checked.ok()) return Invalid(std::string(checked.message()));
  return absl::OkStatus();
}

// The proposal an ELBO request is scored with (ScoreRequest.time_sampling):
// the model's unless the request asks for uniform times; null = uniform.
absl::StatusOr<std::shared_ptr<const TimeProposal>> TimeProposalFor(
    const v1::ScoreRequest& r, ScoreMethod method,
    const ModelDescription& model) {
  const v1::TimeSampling sampling = r.time_sampling();
  if (sampling != v1::TIME_SAMPLING_UNSPECIFIED && method != ScoreMethod::kElbo) {
    return Invalid(
        "time_sampling applies with method ELBO only (the ODE draws no "
        "diffusion times); leave it unset");
  }
  switch (sampling) {
    case v1::TIME_SAMPLING_UNSPECIFIED:
      return method == ScoreMethod::kElbo ? model.time_proposal : nullptr;
    case v1::TIME_SAMPLING_UNIFORM:
      return std::shared_ptr<const TimeProposal>();
    case v1::TIME_SAMPLING_PROPOSAL:
      if (model.time_proposal == nullptr) {
        return Invalid(
            "time_sampling: TIME_SAMPLING_PROPOSAL, but the served model has "
            "no time proposal (its calibration file has no time_proposal "
            "section; GetModelInfo.time_proposal is false)");
      }
      return model.time_proposal;
    default:
      return Invalid(absl::StrCat("time_sampling: unknown value ",
                                  static_cast<int>(sampling),
                                  "; see enum vdm.v1.TimeSampling"));
  }
}

// The thorough anomaly level's part of a job (ScoreRequest.anomaly_level):
// the calibration's probes and the model's feature network, or nothing at
// the fast level.
absl::Status ToAnomalyLevel(const v1::ScoreRequest& r,
                            const ModelDescription& model, ScoreJob* job) {
  switch (r.anomaly_level()) {
    case v1::ANOMALY_LEVEL_UNSPECIFIED:
    case v1::ANOMALY_LEVEL_FAST:
      return absl::OkStatus();
    case v1::ANOMALY_LEVEL_THOROUGH:
      break;
    default:
      return Invalid(absl::StrCat("anomaly_level: unknown value ",
                                  static_cast<int>(r.anomaly_level()),
                                  "; see enum vdm.v1.AnomalyLevel"));
  }
  if (job->method != ScoreMethod::kElbo) {
    return Invalid(
        "anomaly_level: THOROUGH applies with method ELBO only (the ODE "
        "computes no anomaly fields)");
  }
  if (model.feature_model == nullptr || model.thorough == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "anomaly_level: THOROUGH is not served for this model: it needs ",
        model.feature_model == nullptr
            ? "a feature model (<model>.features.pt, vdm-server --feature_model)"
            : "",
        model.feature_model == nullptr && model.thorough == nullptr ? " and "
                                                                    : "",
        model.thorough == nullptr
            ? "an anomaly.thorough calibration (vdm-calibrate --feature_model)"
            : "",
        "; GetModelInfo.thorough_available says whether it is"));
  }
  job->thorough = model.thorough->setup();
  job->feature_model = model.feature_model;
  job->reference = model.thorough->reference();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ScoreJob> ToScoreJob(const v1::ScoreRequest& r,
                                    const RequestLimits& limits,
                                    const ModelDescription& model) {
  ScoreJob job;
  const int n = r.images_size();
  VDM_RETURN_IF_ERROR(CheckImageList(n, r.format(), limits));
  job.timesteps = r.timesteps() == 0 ? kDefaultTimesteps : r.timesteps();
  if (job.timesteps < 2 || job.timesteps > limits.max_timesteps) {
    return Invalid(absl::StrFormat("timesteps: %d is out of range [2, %d]",
                                   r.timesteps(), limits.max_timesteps));
  }
  VDM_ASSIGN_OR_RETURN(job.label, CheckLabel(model, r.has_label(), r.label()));
  VDM_ASSIGN_OR_RETURN(job.method, ScoreMethodFromProto(r.method()));
  VDM_RETURN_IF_ERROR(ToOdeOptions(r, job.method, &job.ode));
  VDM_RETURN_IF_ERROR(ToAnomalyLevel(r, model, &job));
  const int64_t rows = ScoreJobRowCost(job, n);
  if (job.method == ScoreMethod::kOde && rows > limits.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d trace_samples x %d function "
        "evaluations (%s) = %d rows, more than this server admits for one "
        "request (%d, --max_queued_rows); send fewer images or evaluations",
        n, job.ode.trace_samples, OdeMaxEvaluations(job.ode),
        job.ode.solver == OdeSolver::kRk4 ? "4 x ode_steps"
                                          : "ode_max_evaluations",
        rows, limits.max_request_rows));
  }
  if (rows > limits.max_request_rows) {
    return Invalid(absl::StrFormat(
        "request too large: %d images x %d rows each (timesteps%s) = %d "
        "rows, more than this server admits for one request (%d, "
        "--max_queued_rows); send fewer images per call",
        n, rows / std::max(n, 1),
        job.thorough ? " and the thorough level's probes" : "", rows,
        limits.max_request_rows));
  }
  VDM_ASSIGN_OR_RETURN(job.images,
                       DecodeImages(r.images(), r.format(), model.shape));
  if (r.has_false_positive_rate() &&
      !(r.false_positive_rate() > 0.0f && r.false_positive_rate() <= 0.5f)) {
    return Invalid(absl::StrCat("false_positive_rate: ",
                                r.false_positive_rate(),
                                " is out of range (0, 0.5]"));
  }
  job.seed = PickSeed(r.has_seed(), r.seed());
  job.shared_noise = r.shared_noise();
  job.pixel_map = r.anomaly_map();
  VDM_ASSIGN_OR_RETURN(job.time_proposal, TimeProposalFor(r, job.method, model));
  return job;
}

}  // namespace vdm
