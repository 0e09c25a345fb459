#include "model/vdm/rows.h"

#include <ATen/ATen.h>

namespace vdm {

Rows Rows::Slice(int64_t begin, int64_t count) const {
  Rows r;
  r.z = z.narrow(0, begin, count);
  r.gamma = gamma.narrow(0, begin, count);
  if (label.defined()) r.label = label.narrow(0, begin, count);
  if (probe.defined()) r.probe = probe.narrow(0, begin, count);
  return r;
}

Evaluation Evaluation::Slice(int64_t begin, int64_t count) const {
  Evaluation e;
  e.eps = eps.narrow(0, begin, count);
  if (vjp.defined()) e.vjp = vjp.narrow(0, begin, count);
  if (background.defined()) e.background = background.narrow(0, begin, count);
  return e;
}

Rows Rows::Cat(const std::vector<Rows>& parts) {
  if (parts.size() == 1) return parts.front();
  std::vector<at::Tensor> z, gamma, label, probe;
  for (const Rows& p : parts) {
    z.push_back(p.z);
    gamma.push_back(p.gamma);
    if (p.label.defined()) label.push_back(p.label);
    if (p.probe.defined()) probe.push_back(p.probe);
  }
  Rows r;
  if (z.empty()) return r;
  r.z = at::cat(z);
  r.gamma = at::cat(gamma);
  if (label.size() == parts.size()) r.label = at::cat(label);
  if (probe.size() == parts.size()) r.probe = at::cat(probe);
  return r;
}

absl::StatusOr<at::Tensor> Evaluate(Denoiser& model, const Rows& rows,
                                    bool fp32) {
  const at::Tensor label =
      rows.label.defined()
          ? rows.label
          : at::full({rows.size()}, int64_t{model.num_classes()}, at::kLong);
  return fp32 ? model.DenoiseFp32(rows.z, rows.gamma, label)
              : model.Denoise(rows.z, rows.gamma, label);
}

absl::StatusOr<EpsVjp> EvaluateVjp(Denoiser& model, const Rows& rows) {
  if (!rows.probe.defined()) {
    return absl::InternalError("EvaluateVjp: rows without probes");
  }
  const at::Tensor label =
      rows.label.defined()
          ? rows.label
          : at::full({rows.size()}, int64_t{model.num_classes()}, at::kLong);
  return model.DenoiseVjp(rows.z, rows.gamma, label, rows.probe);
}

}  // namespace vdm
