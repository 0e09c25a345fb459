#include "model/vdm/diffusion.h"

#include <ATen/ATen.h>

#include <cmath>

namespace vdm {
namespace {

// Reshapes a per-row vector [B] (or a scalar) so it broadcasts against a
// batch of images [B, C, H, W].
at::Tensor PerRow(const at::Tensor& v, const at::Tensor& like) {
  if (v.dim() == 0 || v.numel() == 1) return v.reshape({});
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = v.size(0);
  return v.reshape(shape);
}

// Sum over all but the first dimension: per-image totals.
at::Tensor SumPerImage(const at::Tensor& x) {
  return x.flatten(1).sum(1);
}

}  // namespace

at::Tensor AlphaSquared(const at::Tensor& gamma) { return at::sigmoid(-gamma); }
at::Tensor SigmaSquared(const at::Tensor& gamma) { return at::sigmoid(gamma); }

at::Tensor LinearGamma(const at::Tensor& t, double gamma_min,
                       double gamma_max) {
  return gamma_min + (gamma_max - gamma_min) * t;
}

at::Tensor ToModelSpace(const at::Tensor& x_uint8) {
  return (x_uint8.to(at::kFloat) + 0.5f) * (2.0f / 256.0f) - 1.0f;
}

at::Tensor ToUint8(const at::Tensor& x) {
  // Inverse of ToModelSpace with rounding to the nearest bin centre.
  return at::floor((x + 1.0) * 128.0).clamp(0, 255).to(at::kByte);
}

at::Tensor DecodeMostLikely(const at::Tensor& z0, const at::Tensor& gamma0) {
  // The decoder's logits are a Gaussian around z0 / alpha0 over the bin
  // centres, so the most likely value is the nearest centre.
  const at::Tensor alpha0 = at::sqrt(AlphaSquared(PerRow(gamma0, z0)));
  return ToUint8(z0 / alpha0);
}

at::Tensor Diffuse(const at::Tensor& f, const at::Tensor& gamma,
                   const at::Tensor& eps) {
  const at::Tensor g = PerRow(gamma, f);
  return at::sqrt(AlphaSquared(g)) * f + at::sqrt(SigmaSquared(g)) * eps;
}

at::Tensor ToEps(const std::string& prediction, const at::Tensor& output,
                 const at::Tensor& z, const at::Tensor& gamma) {
  if (prediction == "eps") return output;
  const at::Tensor g = PerRow(gamma, z);
  const at::Tensor alpha = at::sqrt(AlphaSquared(g));
  const at::Tensor sigma = at::sqrt(SigmaSquared(g));
  if (prediction == "v") return sigma * z + alpha * output;
  // "x": eps = (z - alpha x) / sigma.
  return (z - alpha * output) / sigma;
}

at::Tensor PredictX(const at::Tensor& z, const at::Tensor& gamma,
                    const at::Tensor& eps_hat) {
  const at::Tensor g = PerRow(gamma, z);
  return (z - at::sqrt(SigmaSquared(g)) * eps_hat) / at::sqrt(AlphaSquared(g));
}

at::Tensor PriorKl(const at::Tensor& f, const at::Tensor& gamma1) {
  const at::Tensor s2 = SigmaSquared(PerRow(gamma1, f));
  // log sigma^2 = log sigmoid(gamma), computed stably.
  const at::Tensor log_s2 = at::log_sigmoid(PerRow(gamma1, f));
  const at::Tensor kl = 0.5 * ((1.0 - s2) * f * f + s2 - log_s2 - 1.0);
  return SumPerImage(kl.expand_as(f));
}

at::Tensor ReconstructionNll(const at::Tensor& x_uint8,
                             const at::Tensor& gamma0, const at::Tensor& eps0) {
  const at::Tensor f = ToModelSpace(x_uint8).to(eps0.scalar_type());
  const at::Tensor g0 = PerRow(gamma0, f).to(eps0.scalar_type());
  const at::Tensor z0 = f + at::exp(0.5 * g0) * eps0;
  const at::Tensor centres =
      (at::arange(256, eps0.options()) + 0.5) * (2.0 / 256.0) - 1.0;
  // logits [..., 256] = -0.5 ((z0 - x_k) / exp(gamma0 / 2))^2.
  const at::Tensor scale = at::exp(-0.5 * g0).unsqueeze(-1);
  const at::Tensor d = (z0.unsqueeze(-1) - centres) * scale;
  const at::Tensor log_p = at::log_softmax(-0.5 * d * d, -1);
  const at::Tensor picked =
      log_p.gather(-1, x_uint8.to(at::kLong).unsqueeze(-1)).squeeze(-1);
  return -SumPerImage(picked);
}

at::Tensor DiffusionLossContinuous(const at::Tensor& eps,
                                   const at::Tensor& eps_hat,
                                   const at::Tensor& dgamma_dt) {
  const at::Tensor sq = SumPerImage((eps - eps_hat).pow(2));
  return 0.5 * dgamma_dt.reshape({-1}) * sq;
}

at::Tensor DiffusionLossDiscrete(const at::Tensor& eps,
                                 const at::Tensor& eps_hat,
                                 const at::Tensor& gamma_t,
                                 const at::Tensor& gamma_s, int64_t steps) {
  const at::Tensor sq = SumPerImage((eps - eps_hat).pow(2));
  return 0.5 * static_cast<double>(steps) *
         at::expm1(gamma_t - gamma_s).reshape({-1}) * sq;
}

at::Tensor NatsToBpd(const at::Tensor& nats, int64_t dims) {
  return nats / (static_cast<double>(dims) * std::log(2.0));
}

at::Tensor StratifiedTimes(int64_t k, double u) {
  return (at::arange(k, at::kDouble) + u) / static_cast<double>(k);
}

at::Tensor DdimStep(const at::Tensor& z_t, const at::Tensor& eps_hat,
                    const at::Tensor& gamma_t, const at::Tensor& gamma_s,
                    const at::Tensor& eta, const at::Tensor& xi) {
  const at::Tensor gt = PerRow(gamma_t, z_t);
  const at::Tensor gs = PerRow(gamma_s, z_t);
  const at::Tensor x_hat = PredictX(z_t, gamma_t, eps_hat);
  const at::Tensor sigma_s2 = SigmaSquared(gs);
  const at::Tensor c = -at::expm1(gs - gt);
  const at::Tensor e = PerRow(eta, z_t);
  const at::Tensor s2 = e * e * sigma_s2 * c;
  return at::sqrt(AlphaSquared(gs)) * x_hat +
         at::sqrt(at::clamp_min(sigma_s2 - s2, 0.0)) * eps_hat +
         at::sqrt(s2) * xi;
}

at::Tensor Guide(const at::Tensor& eps_uncond, const at::Tensor& eps_cond,
                 const at::Tensor& scale) {
  return eps_uncond + PerRow(scale, eps_uncond) * (eps_cond - eps_uncond);
}

}  // namespace vdm
