#include "model/train/preview.h"

#include <ATen/ATen.h>

#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/vdm/samplers.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/tensor_image.h"
#include "model/vdm/torchscript_model.h"

namespace vdm {

absl::StatusOr<std::pair<at::Tensor, at::Tensor>> SampleGuided(
    torch::jit::Module& module, const ModelInfo& info,
    const SampleGridOptions& o) {
  if (o.per_class < 1 || o.steps < 1) {
    return absl::InvalidArgumentError("per_class and steps must be >= 1");
  }
  TorchScriptModel::Options model_options;
  model_options.device = info.device.str();
  model_options.check_forward = false;
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<TorchScriptModel> model,
                       TorchScriptModel::FromModule(module, model_options));
  const int rows = std::max(1, info.num_classes);
  SampleOptions options;
  options.sampler.type = SamplerType::kDdim;
  options.sampler.eta = 0.0;
  options.sampler.steps = o.steps;
  options.num_images = static_cast<int64_t>(rows) * o.per_class;
  options.seed = o.seed;
  options.stop = o.stop;
  options.conditioning.guidance_scale = o.guidance;
  at::Tensor labels = at::zeros({options.num_images}, at::kLong);
  if (info.num_classes > 0) {
    labels = at::arange(rows, at::kLong).repeat_interleave(o.per_class);
    options.labels = labels;
  }
  torch::NoGradGuard no_grad;
  VDM_ASSIGN_OR_RETURN(at::Tensor images, SampleImages(*model, options));
  return std::make_pair(images, labels);
}

absl::StatusOr<Image8> SampleGrid(torch::jit::Module& module,
                                  const ModelInfo& info,
                                  const SampleGridOptions& o) {
  VDM_ASSIGN_OR_RETURN(auto samples, SampleGuided(module, info, o));
  return MakeGrid(ToImages(samples.first), o.per_class);
}

}  // namespace vdm
