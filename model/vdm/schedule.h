// The noise schedule as a callable, shared by the samplers and the
// likelihood: gamma(t) and gamma'(t) for times t [B] (float32, any device),
// exactly the Denoiser's Gamma.
#ifndef VDM_MODEL_VDM_SCHEDULE_H_
#define VDM_MODEL_VDM_SCHEDULE_H_

#include <ATen/core/Tensor.h>

#include <functional>

#include "absl/status/statusor.h"
#include "model/vdm/denoiser.h"

namespace vdm {

using ScheduleFn =
    std::function<absl::StatusOr<GammaValues>(const at::Tensor& t)>;

// The schedule of `model` (which must outlive the returned function).
inline ScheduleFn ScheduleOf(Denoiser& model) {
  return [&model](const at::Tensor& t) { return model.Gamma(t); };
}

}  // namespace vdm

#endif  // VDM_MODEL_VDM_SCHEDULE_H_
