#include "model/vdm/testing/oracle.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "model/vdm/diffusion.h"

namespace vdm {
namespace {

constexpr double kWarp = 3.0;  // shape parameter of OracleSchedule::kWarped
// Quadrature nodes of ExpectedVlbPerValue (eps on [-8, 8], gamma over
// [gamma(0), gamma(1)]); they agree with 5x and 6x finer grids to ~1e-6 nats
// per pixel.
constexpr int64_t kEpsNodes = 321;
constexpr int64_t kGammaNodes = 321;

at::Tensor Vector(const std::vector<double>& v) {
  return at::tensor(v, at::kDouble);
}

absl::Status CheckOptions(const OracleOptions& o) {
  if (o.shape.dims() <= 0) return absl::InvalidArgumentError("oracle: shape");
  if (o.values.empty() || o.pmfs.empty()) {
    return absl::InvalidArgumentError("oracle: values and pmfs must be set");
  }
  for (int v : o.values) {
    if (v < 0 || v > 255) return absl::InvalidArgumentError("oracle: value");
  }
  for (const auto& p : o.pmfs) {
    if (p.size() != o.values.size()) {
      return absl::InvalidArgumentError("oracle: pmf size != values size");
    }
    double total = 0;
    for (double q : p) total += q;
    if (std::abs(total - 1.0) > 1e-9) {
      return absl::InvalidArgumentError(
          absl::StrCat("oracle: pmf sums to ", total));
    }
  }
  if (!o.class_prior.empty() && o.class_prior.size() != o.pmfs.size()) {
    return absl::InvalidArgumentError("oracle: class_prior size");
  }
  if (!(o.gamma_min < o.gamma_max)) {
    return absl::InvalidArgumentError("oracle: gamma_min >= gamma_max");
  }
  return absl::OkStatus();
}

}  // namespace

OracleDenoiser::OracleDenoiser(const OracleOptions& options)
    : options_(options),
      num_classes_(
          options.pmfs.size() > 1 ? static_cast<int>(options.pmfs.size()) : 0) {
  std::vector<double> f;
  for (int v : options.values) f.push_back(2.0 * (v + 0.5) / 256.0 - 1.0);
  f_values_ = Vector(f);
  std::vector<at::Tensor> rows;
  for (const auto& p : options.pmfs) rows.push_back(Vector(p));
  log_pmf_ = at::log(at::stack(rows));
  const int64_t c = static_cast<int64_t>(options.pmfs.size());
  log_prior_ =
      options.class_prior.empty()
          ? at::full({c}, -std::log(static_cast<double>(c)), at::kDouble)
          : at::log(Vector(options.class_prior));
}

absl::StatusOr<std::unique_ptr<OracleDenoiser>> OracleDenoiser::Create(
    const OracleOptions& options) {
  absl::Status s = CheckOptions(options);
  if (!s.ok()) return s;
  return std::unique_ptr<OracleDenoiser>(new OracleDenoiser(options));
}

at::Tensor OracleDenoiser::LogClassWeights(const at::Tensor& label) const {
  const int64_t c = log_pmf_.size(0);
  const int64_t b = label.size(0);
  at::Tensor lw = log_prior_.reshape({1, c}).repeat({b, 1});
  if (num_classes_ == 0) return lw;
  const at::Tensor l = label.to(at::kCPU).to(at::kLong);
  const at::Tensor onehot = at::one_hot(l.clamp(0, c - 1), c).to(at::kDouble);
  const at::Tensor conditional = at::log(onehot);  // 0 / -inf
  return at::where((l < c).reshape({b, 1}), conditional, lw);
}

at::Tensor OracleDenoiser::PosteriorMean(const at::Tensor& z,
                                         const at::Tensor& gamma,
                                         const at::Tensor& label) const {
  const int64_t b = z.size(0);
  const at::Tensor zz = z.to(at::kCPU).to(at::kDouble).reshape({b, -1, 1, 1});
  const at::Tensor g =
      gamma.to(at::kCPU).to(at::kDouble).reshape({-1}).expand({b});
  const at::Tensor alpha = at::sqrt(AlphaSquared(g)).reshape({b, 1, 1, 1});
  const at::Tensor sigma2 = SigmaSquared(g).reshape({b, 1, 1, 1});
  // [B, D, classes, J]: log p_cj + log N(z_i; alpha f_j, sigma^2) (+ const).
  const at::Tensor d = zz - alpha * f_values_.reshape({1, 1, 1, -1});
  const at::Tensor log_w =
      log_pmf_.unsqueeze(0).unsqueeze(0) - 0.5 * d * d / sigma2;
  const at::Tensor per_class_mean =
      (at::softmax(log_w, -1) * f_values_).sum(-1);          // [B, D, classes]
  const at::Tensor log_marginal = at::logsumexp(log_w, -1);  // [B, D, classes]
  const at::Tensor class_post =
      at::softmax(LogClassWeights(label) + log_marginal.sum(1), -1);
  const at::Tensor mean = (per_class_mean * class_post.unsqueeze(1)).sum(-1);
  return mean.reshape(z.sizes());
}

at::Tensor OracleDenoiser::OptimalEps(const at::Tensor& z,
                                      const at::Tensor& gamma,
                                      const at::Tensor& label) const {
  const at::Tensor x_hat = PosteriorMean(z, gamma, label);
  const at::Tensor g =
      gamma.to(at::kCPU).to(at::kDouble).reshape({-1, 1, 1, 1});
  const at::Tensor zz = z.to(at::kCPU).to(at::kDouble);
  return (zz - at::sqrt(AlphaSquared(g)) * x_hat) / at::sqrt(SigmaSquared(g));
}

absl::StatusOr<at::Tensor> OracleDenoiser::Denoise(const at::Tensor& z,
                                                   const at::Tensor& gamma,
                                                   const at::Tensor& label) {
  const ImageShape s = options_.shape;
  if (z.dim() != 4 || z.size(1) != s.channels || z.size(2) != s.height ||
      z.size(3) != s.width || gamma.numel() != z.size(0) ||
      label.numel() != z.size(0)) {
    return absl::InvalidArgumentError("oracle: bad input shapes");
  }
  return OptimalEps(z, gamma, label).to(at::kFloat).to(z.device());
}

absl::StatusOr<EpsVjp> OracleDenoiser::DenoiseVjp(const at::Tensor& z,
                                                  const at::Tensor& gamma,
                                                  const at::Tensor& label,
                                                  const at::Tensor& v) {
  if (v.sizes() != z.sizes()) {
    return absl::InvalidArgumentError("oracle: v must have z's shape");
  }
  at::AutoGradMode grad_mode(true);
  const at::Tensor zz = z.detach().to(at::kCPU).to(at::kDouble).requires_grad_(true);
  const at::Tensor eps = OptimalEps(zz, gamma, label);
  const at::Tensor inner = (eps * v.to(at::kCPU).to(at::kDouble)).sum();
  const at::Tensor vjp = torch::autograd::grad({inner}, {zz})[0];
  return EpsVjp{eps.detach().to(at::kFloat).to(z.device()),
                vjp.to(at::kFloat).to(z.device())};
}

at::Tensor OracleDenoiser::LogMarginal(const at::Tensor& z,
                                       const at::Tensor& gamma,
                                       const at::Tensor& label) const {
  const int64_t b = z.size(0);
  const at::Tensor zz = z.to(at::kCPU).to(at::kDouble).reshape({b, -1, 1, 1});
  const at::Tensor g =
      gamma.to(at::kCPU).to(at::kDouble).reshape({-1}).expand({b});
  const at::Tensor alpha = at::sqrt(AlphaSquared(g)).reshape({b, 1, 1, 1});
  const at::Tensor sigma2 = SigmaSquared(g).reshape({b, 1, 1, 1});
  const at::Tensor d = zz - alpha * f_values_.reshape({1, 1, 1, -1});
  // [B, D, classes, J]: log p_cj + log N(z_i; alpha f_j, sigma^2).
  const at::Tensor log_w = log_pmf_.unsqueeze(0).unsqueeze(0) -
                           0.5 * d * d / sigma2 -
                           0.5 * at::log(2 * M_PI * sigma2);
  const at::Tensor per_class = at::logsumexp(log_w, -1).sum(1);  // [B, classes]
  return at::logsumexp(LogClassWeights(label) + per_class, -1);
}

absl::StatusOr<GammaValues> OracleDenoiser::Gamma(const at::Tensor& t) {
  const double g0 = options_.gamma_min, span = options_.gamma_max - g0;
  if (options_.schedule == OracleSchedule::kLinear) {
    return GammaValues{g0 + span * t, at::full_like(t, span)};
  }
  const double norm = std::expm1(kWarp);
  return GammaValues{g0 + span * at::expm1(kWarp * t) / norm,
                     span * kWarp * at::exp(kWarp * t) / norm};
}

at::Tensor OracleDenoiser::LogLikelihoodPerClass(const at::Tensor& x_uint8,
                                                 double off_support) const {
  const int64_t b = x_uint8.size(0);
  at::Tensor on_support = at::zeros({256}, at::kBool);
  for (int v : options_.values) on_support[v] = true;
  const at::Tensor x = x_uint8.to(at::kCPU).to(at::kLong).reshape({-1});
  const at::Tensor valid = on_support.index_select(0, x).reshape({b, -1, 1});
  // log P(x_i | c): [B, D, classes].
  const at::Tensor lp = log_pmf_.t()
                            .index_select(0, ValueIndex(x_uint8).reshape({-1}))
                            .reshape({b, valid.size(1), -1});
  return at::where(valid, lp, at::full_like(lp, off_support)).sum(1);
}

at::Tensor OracleDenoiser::ExactNll(const at::Tensor& x_uint8,
                                    const at::Tensor& label) const {
  const at::Tensor ll =
      LogLikelihoodPerClass(x_uint8, -std::numeric_limits<double>::infinity());
  return -at::logsumexp(LogClassWeights(label) + ll, -1);
}

at::Tensor OracleDenoiser::ValueIndex(const at::Tensor& x_uint8) const {
  at::Tensor index = at::full({256}, 0, at::kLong);
  for (size_t j = 0; j < options_.values.size(); ++j) {
    index[options_.values[j]] = static_cast<int64_t>(j);
  }
  const at::Tensor x =
      x_uint8.to(at::kCPU).to(at::kLong).reshape({x_uint8.size(0), -1});
  return index.index_select(0, x.reshape({-1})).reshape(x.sizes());
}

at::Tensor OracleDenoiser::PixelMmse(const at::Tensor& gamma,
                                     int64_t label) const {
  // Gaussian quadrature weights on a uniform eps grid.
  const at::Tensor e = at::linspace(-8.0, 8.0, kEpsNodes, at::kDouble);
  const at::Tensor w = at::softmax(-0.5 * e * e, 0);
  const at::Tensor g = gamma.to(at::kCPU).to(at::kDouble).reshape({-1});
  const int64_t ne = e.size(0), ng = g.size(0), nj = f_values_.size(0);
  at::Tensor out = at::empty({nj, ng}, at::kDouble);
  constexpr int64_t kChunk = 32;
  for (int64_t i = 0; i < ng; i += kChunk) {
    const int64_t m = std::min(kChunk, ng - i);
    const at::Tensor gi = g.narrow(0, i, m).reshape({1, m, 1});
    // z [J, m, E]; every entry is a one-pixel image.
    const at::Tensor z =
        at::sqrt(AlphaSquared(gi)) * f_values_.reshape({nj, 1, 1}) +
        at::sqrt(SigmaSquared(gi)) * e;
    const at::Tensor eps_hat =
        OptimalEps(z.reshape({-1, 1, 1, 1}),
                   gi.expand({nj, m, ne}).reshape({-1}),
                   at::full({nj * m * ne}, label, at::kLong))
            .reshape({nj, m, ne});
    out.narrow(1, i, m).copy_(((e - eps_hat).pow(2) * w).sum(2));
  }
  return out;
}

at::Tensor OracleDenoiser::EndpointTermsPerValue() const {
  const int64_t nj = f_values_.size(0);
  const at::Tensor e = at::linspace(-8.0, 8.0, kEpsNodes, at::kDouble);
  const at::Tensor w = at::softmax(-0.5 * e * e, 0);
  std::vector<int64_t> values(options_.values.begin(), options_.values.end());
  // recon [J]: E over eps0 of -log p(x | z0), by quadrature.
  const at::Tensor x = at::tensor(values, at::kLong).reshape({nj, 1, 1, 1});
  const at::Tensor recon =
      (ReconstructionNll(x.repeat_interleave(e.size(0), 0),
                         at::full({1}, options_.gamma_min, at::kDouble),
                         e.repeat({nj}).reshape({-1, 1, 1, 1}))
           .reshape({nj, -1}) *
       w)
          .sum(1);
  const at::Tensor prior =
      PriorKl(f_values_.reshape({nj, 1, 1, 1}),
              at::full({1}, options_.gamma_max, at::kDouble));
  return prior + recon;
}

at::Tensor OracleDenoiser::ExpectedVlbPerValue(int64_t label,
                                               int discrete_steps) {
  at::Tensor diffusion;
  if (discrete_steps == 0) {
    // 0.5 int mse dgamma over [gamma(0), gamma(1)] (trapezoid).
    const at::Tensor g = at::linspace(options_.gamma_min, options_.gamma_max,
                                      kGammaNodes, at::kDouble);
    const at::Tensor mse = PixelMmse(g, label);
    const double dg = (options_.gamma_max - options_.gamma_min) /
                      static_cast<double>(kGammaNodes - 1);
    diffusion =
        0.5 * dg * (mse.sum(1) - 0.5 * (mse.select(1, 0) + mse.select(1, -1)));
  } else {
    // sum_i 0.5 expm1(gamma(t_i) - gamma(s_i)) mse(gamma(t_i)).
    const double t = discrete_steps;
    const at::Tensor i = at::arange(1, discrete_steps + 1, at::kDouble);
    const at::Tensor gt = Gamma(i / t).value().gamma;
    const at::Tensor gs = Gamma((i - 1) / t).value().gamma;
    diffusion = (0.5 * at::expm1(gt - gs) * PixelMmse(gt, label)).sum(1);
  }
  return EndpointTermsPerValue() + diffusion;
}

at::Tensor OracleDenoiser::ExpectedVlb(const at::Tensor& x_uint8, int64_t label,
                                       int discrete_steps) {
  return ExpectedVlbPerValue(label, discrete_steps)
      .index_select(0, ValueIndex(x_uint8).reshape({-1}))
      .reshape({x_uint8.size(0), -1})
      .sum(1);
}

at::Tensor OracleDenoiser::PixelPmf(int64_t label) const {
  const at::Tensor w =
      at::exp(LogClassWeights(at::full({1}, label, at::kLong)))[0];
  const at::Tensor p = (at::exp(log_pmf_) * w.unsqueeze(1)).sum(0);
  at::Tensor out = at::zeros({256}, at::kDouble);
  for (size_t j = 0; j < options_.values.size(); ++j) {
    out[options_.values[j]] = p[static_cast<int64_t>(j)];
  }
  return out;
}

at::Tensor OracleDenoiser::ClassPosterior(const at::Tensor& x_uint8) const {
  // Pixels off the support (decoding errors of a sampler) carry no evidence.
  return at::softmax(LogLikelihoodPerClass(x_uint8, 0.0) + log_prior_, -1);
}

at::Tensor OracleDenoiser::Sample(int64_t n, int64_t label,
                                  at::Generator& gen) const {
  const ImageShape s = options_.shape;
  const at::Tensor w =
      at::exp(LogClassWeights(at::full({n}, label, at::kLong)));
  const at::Tensor cls = at::multinomial(w, 1, true, gen).reshape({-1});
  const at::Tensor probs = at::exp(log_pmf_).index_select(0, cls);  // [n, J]
  const at::Tensor j = at::multinomial(probs, s.dims(), true, gen);
  std::vector<int64_t> values(options_.values.begin(), options_.values.end());
  const at::Tensor v = at::tensor(values, at::kLong);
  return v.index_select(0, j.reshape({-1}))
      .reshape({n, s.channels, s.height, s.width})
      .to(at::kByte);
}

absl::StatusOr<at::Tensor> ParameterizedOracle::Denoise(
    const at::Tensor& z, const at::Tensor& gamma, const at::Tensor& label) {
  const at::Tensor x_hat = oracle_->PosteriorMean(z, gamma, label);
  const at::Tensor eps = oracle_->OptimalEps(z, gamma, label);
  const at::Tensor g = gamma.to(at::kDouble).reshape({-1, 1, 1, 1});
  const at::Tensor alpha = at::sqrt(AlphaSquared(g));
  const at::Tensor sigma = at::sqrt(SigmaSquared(g));
  at::Tensor output;
  if (prediction_ == "eps") {
    output = eps;
  } else if (prediction_ == "x") {
    output = x_hat;
  } else if (prediction_ == "v") {
    output = alpha * eps - sigma * x_hat;
  } else {
    return absl::InvalidArgumentError("unknown prediction " + prediction_);
  }
  // What TorchScriptModel does with a float32 network output.
  return ToEps(prediction_, output.to(at::kFloat), z.to(at::kFloat),
               gamma.to(at::kFloat));
}

double PixelTvDistance(const at::Tensor& x_uint8, const at::Tensor& pmf) {
  const at::Tensor flat = x_uint8.to(at::kCPU).to(at::kLong).reshape({-1});
  const at::Tensor hist = at::bincount(flat, {}, 256).to(at::kDouble) /
                          static_cast<double>(flat.numel());
  return 0.5 * (hist - pmf.to(at::kDouble)).abs().sum().item<double>();
}

}  // namespace vdm
