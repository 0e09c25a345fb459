#include "model/vdm/reconstruction.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <utility>

#include "absl/strings/str_cat.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/status_macros.h"

namespace vdm {

ReconstructionOptions ProbesOf(const ThoroughSetup& setup) {
  ReconstructionOptions o;
  o.times = setup.times;
  o.draws = setup.draws;
  o.seed = setup.probe_seed;
  return o;
}

absl::Status CheckReconstructionOptions(const ReconstructionOptions& o) {
  if (o.times.empty()) {
    return absl::InvalidArgumentError("reconstruction times: none given");
  }
  for (double t : o.times) {
    if (!(t > 0.0 && t < 1.0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("reconstruction times must be in (0, 1), got ", t));
    }
  }
  if (o.draws < 1 || o.draws > 64) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reconstruction draws must be in [1, 64], got ", o.draws));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<ReconstructionPlan>> ReconstructionPlan::Create(
    const at::Tensor& x_uint8, const at::Tensor& labels,
    const ReconstructionOptions& options, const ScheduleFn& schedule) {
  VDM_RETURN_IF_ERROR(CheckReconstructionOptions(options));
  if (!x_uint8.defined() || x_uint8.dim() != 4 || x_uint8.size(0) < 1 ||
      x_uint8.is_floating_point()) {
    return absl::InvalidArgumentError(
        "images must be an integer [n, C, H, W] tensor with n >= 1");
  }
  if (labels.defined() && labels.numel() != x_uint8.size(0)) {
    return absl::InvalidArgumentError("labels must have one entry per image");
  }
  std::unique_ptr<ReconstructionPlan> plan(new ReconstructionPlan(options));
  try {
    const at::Tensor x = x_uint8.to(at::kCPU);
    if (x.min().item<int64_t>() < 0 || x.max().item<int64_t>() > 255) {
      return absl::InvalidArgumentError("pixel values must be in 0..255");
    }
    plan->f_ = ToModelSpace(x).contiguous();
    if (labels.defined()) {
      plan->labels_ = labels.to(at::kCPU).to(at::kLong).reshape({-1});
    }
    const int64_t p = options.probes();
    at::Tensor t = at::empty({p}, at::kDouble);
    for (int64_t i = 0; i < p; ++i) {
      t[i] = options.times[static_cast<size_t>(i / options.draws)];
    }
    VDM_ASSIGN_OR_RETURN(GammaValues g, schedule(t.to(at::kFloat)));
    if (!g.gamma.defined() || g.gamma.numel() != p) {
      return absl::InvalidArgumentError("schedule returned a wrong shape");
    }
    plan->gamma_ = g.gamma.to(at::kCPU).to(at::kFloat).reshape({-1});
    if (!at::isfinite(plan->gamma_).all().item<bool>()) {
      return absl::InvalidArgumentError("schedule returned non-finite values");
    }
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(options.seed);
    std::vector<int64_t> shape = {p};
    for (int64_t d = 1; d < 4; ++d) shape.push_back(plan->f_.size(d));
    plan->eps_ = at::randn(shape, gen, at::kFloat);
    std::vector<int64_t> all = shape;
    all[0] = plan->f_.size(0) * p;
    plan->x_hat_ = at::zeros(all, at::kFloat);
    plan->got_.assign(static_cast<size_t>(all[0]), false);
  } catch (const std::exception& e) {  // c10::Error: no exception leaves
    return absl::InternalError(absl::StrCat("reconstruction plan: ", e.what()));
  }
  return plan;
}

absl::StatusOr<Rows> ReconstructionPlan::RowsAt(int64_t begin,
                                                int64_t count) const {
  if (begin < 0 || count < 1 || begin + count > rows()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "rows [", begin, ", ", begin + count, ") outside [0, ", rows(), ")"));
  }
  const at::Tensor r = at::arange(begin, begin + count, at::kLong);
  const at::Tensor image = r.div(probes(), "floor");
  const at::Tensor probe = r.remainder(probes());
  Rows rows;
  rows.gamma = gamma_.index_select(0, probe);
  rows.z = Diffuse(f_.index_select(0, image), rows.gamma,
                   eps_.index_select(0, probe));
  if (labels_.defined()) rows.label = labels_.index_select(0, image);
  return rows;
}

absl::Status ReconstructionPlan::Consume(int64_t begin,
                                         const at::Tensor& eps_hat) {
  if (!eps_hat.defined() || eps_hat.dim() != 4) {
    return absl::InvalidArgumentError("eps_hat must be [m, C, H, W]");
  }
  const int64_t m = eps_hat.size(0);
  if (begin < 0 || m < 1 || begin + m > rows() ||
      eps_hat.sizes().slice(1) != f_.sizes().slice(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "eps_hat rows [", begin, ", ", begin + m, ") do not fit the plan"));
  }
  for (int64_t r = begin; r < begin + m; ++r) {
    if (got_[static_cast<size_t>(r)]) {
      return absl::InvalidArgumentError(absl::StrCat("row ", r, " given twice"));
    }
  }
  try {
    VDM_ASSIGN_OR_RETURN(const Rows rows, RowsAt(begin, m));
    const at::Tensor x_hat = PredictX(
        rows.z, rows.gamma, eps_hat.to(at::kCPU).to(at::kFloat));
    x_hat_.narrow(0, begin, m).copy_(x_hat.clamp(-1.0, 1.0));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("reconstruction: ", e.what()));
  }
  for (int64_t r = begin; r < begin + m; ++r) got_[static_cast<size_t>(r)] = true;
  received_ += m;
  return absl::OkStatus();
}

at::Tensor ReconstructionPlan::reconstructions() const {
  std::vector<int64_t> shape = {num_images(), probes()};
  for (int64_t d = 1; d < 4; ++d) shape.push_back(f_.size(d));
  return ToUint8(x_hat_).reshape(shape);
}

at::Tensor ReconstructionPlan::errors() const {
  const int64_t n = num_images(), j = static_cast<int64_t>(options_.times.size());
  const at::Tensor f = f_.repeat_interleave(probes(), 0).to(at::kDouble);
  const at::Tensor se = (x_hat_.to(at::kDouble) - f).pow(2).flatten(1).mean(1);
  return se.reshape({n, j, options_.draws}).mean(2);
}

at::Tensor ReconstructionPlan::error_map() const {
  const int64_t n = num_images();
  const at::Tensor f = f_.repeat_interleave(probes(), 0).to(at::kDouble);
  const at::Tensor se = (x_hat_.to(at::kDouble) - f).pow(2).sum(1);  // [nP,H,W]
  return se.reshape({n, probes(), f_.size(2), f_.size(3)}).mean(1);
}

absl::StatusOr<std::vector<ThoroughFeatures>> MeasureThorough(
    const ReconstructionPlan& plan, const at::Tensor& x_uint8,
    const FeatureModel& net) {
  if (!plan.complete()) {
    return absl::FailedPreconditionError("reconstruction plan not complete");
  }
  const int64_t n = plan.num_images(), p = plan.probes();
  const int64_t draws = plan.options().draws, levels = p / draws;
  if (!x_uint8.defined() || x_uint8.dim() != 4 || x_uint8.size(0) != n) {
    return absl::InvalidArgumentError("MeasureThorough: not the plan's images");
  }
  VDM_ASSIGN_OR_RETURN(const at::Tensor own, net.Features(x_uint8));
  VDM_ASSIGN_OR_RETURN(const at::Tensor of_recon,
                       net.Features(plan.reconstructions().flatten(0, 1)));
  std::vector<ThoroughFeatures> out(static_cast<size_t>(n));
  try {
    const at::Tensor distance =
        (of_recon.reshape({n, p, -1}) - own.unsqueeze(1))
            .to(at::kDouble)
            .pow(2)
            .sum(2)
            .sqrt()
            .reshape({n, levels, draws})
            .mean(2)
            .contiguous();
    const at::Tensor errors = plan.errors().contiguous();  // [n, J]
    const at::Tensor features = own.contiguous();
    const int64_t d = features.size(1);
    for (int64_t i = 0; i < n; ++i) {
      ThoroughFeatures& t = out[static_cast<size_t>(i)];
      const float* f = features.data_ptr<float>() + i * d;
      t.embedding.assign(f, f + d);
      const double* e = errors.data_ptr<double>() + i * levels;
      t.recon_error.assign(e, e + levels);
      const double* dd = distance.data_ptr<double>() + i * levels;
      t.recon_distance.assign(dd, dd + levels);
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("thorough features: ", e.what()));
  }
  return out;
}

absl::Status AddThoroughFeatures(const ReconstructionPlan& plan,
                                 const at::Tensor& x_uint8,
                                 const FeatureModel& net,
                                 std::vector<ImageBpd>* records) {
  VDM_ASSIGN_OR_RETURN(std::vector<ThoroughFeatures> features,
                       MeasureThorough(plan, x_uint8, net));
  if (records->size() != features.size()) {
    return absl::InvalidArgumentError("AddThoroughFeatures: a record per image");
  }
  for (size_t i = 0; i < features.size(); ++i) {
    (*records)[i].thorough = std::move(features[i]);
  }
  return absl::OkStatus();
}

}  // namespace vdm
