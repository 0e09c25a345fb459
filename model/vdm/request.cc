#include "model/vdm/request.h"

#include "absl/strings/str_cat.h"

namespace vdm {

bool IsGuided(const Conditioning& c, int num_classes) {
  return num_classes > 0 && ((c.label >= 0 && c.guidance_scale != 1.0) ||
                             c.negative_label >= 0);
}

int RowsPerImage(const Conditioning& c, int num_classes) {
  return IsGuided(c, num_classes) ? 2 : 1;
}

int64_t RowLabel(const Conditioning& c, int num_classes) {
  return (num_classes > 0 && c.label >= 0) ? c.label : num_classes;
}

int64_t SecondRowLabel(const Conditioning& c, int num_classes) {
  return (num_classes > 0 && c.negative_label >= 0) ? c.negative_label
                                                    : num_classes;
}

int64_t SampleRowCost(const SamplerConfig& sampler, int64_t num_images,
                      const Conditioning& c, int num_classes) {
  return SamplerEvaluations(sampler) * num_images * RowsPerImage(c, num_classes);
}

int64_t ScoreRowCost(int64_t num_images, int timesteps) {
  return num_images * timesteps;
}

int64_t EncodeRowCost(int64_t num_images, int steps) {
  return num_images * steps;
}

int64_t OdeMaxEvaluations(const OdeOptions& options) {
  return options.solver == OdeSolver::kRk4
             ? int64_t{kRk4Stages} * options.steps
             : int64_t{options.max_evaluations};
}

int64_t OdeRowCost(int64_t num_images, const OdeOptions& options) {
  return num_images * options.trace_samples * OdeMaxEvaluations(options);
}

absl::Status CheckOdeOptions(const OdeOptions& o) {
  if (o.trace_samples < 1 || o.trace_samples > kMaxTraceSamples) {
    return absl::InvalidArgumentError(
        absl::StrCat("trace_samples: ", o.trace_samples,
                     " is out of range [1, ", kMaxTraceSamples, "]"));
  }
  if (o.solver == OdeSolver::kRk4) {
    if (o.steps < 1 || o.steps > kMaxOdeSteps) {
      return absl::InvalidArgumentError(
          absl::StrCat("ode_steps: ", o.steps, " is out of range [1, ",
                       kMaxOdeSteps, "]"));
    }
    return absl::OkStatus();
  }
  if (!(o.rtol >= kMinOdeTolerance && o.rtol <= kMaxOdeTolerance)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ode_rtol: ", o.rtol, " is out of range [",
                     kMinOdeTolerance, ", ", kMaxOdeTolerance, "]"));
  }
  if (!(o.atol >= kMinOdeTolerance && o.atol <= kMaxOdeTolerance)) {
    return absl::InvalidArgumentError(
        absl::StrCat("ode_atol: ", o.atol, " is out of range [",
                     kMinOdeTolerance, ", ", kMaxOdeTolerance, "]"));
  }
  if (o.max_evaluations < kMinOdeEvaluations ||
      o.max_evaluations > kMaxOdeEvaluations) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ode_max_evaluations: ", o.max_evaluations, " is out of range [",
        kMinOdeEvaluations, ", ", kMaxOdeEvaluations, "]"));
  }
  return absl::OkStatus();
}


uint64_t ChunkSeed(uint64_t base, int64_t chunk) {
  // Golden-ratio stride: distinct, well spread seeds for every chunk.
  return base + static_cast<uint64_t>(chunk) * 0x9E3779B97F4A7C15ull;
}

}  // namespace vdm
