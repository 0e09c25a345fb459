// The maths of a Variational Diffusion Model (docs/design.md, "The maths"), on
// tensors, independent of any network. Every function takes per-row vectors
// of gamma or t, so one batch can hold rows at different times. Pure
// functions: thread-safe. Results keep the dtype of their inputs (tests use
// float64, the server float32).
#ifndef VDM_MODEL_VDM_DIFFUSION_H_
#define VDM_MODEL_VDM_DIFFUSION_H_

#include <ATen/core/Tensor.h>

#include <string>

namespace vdm {

// ---- Schedule: alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma). --------
at::Tensor AlphaSquared(const at::Tensor& gamma);
at::Tensor SigmaSquared(const at::Tensor& gamma);
// Linear schedule gamma(t) = gamma_min + (gamma_max - gamma_min) t.
at::Tensor LinearGamma(const at::Tensor& t, double gamma_min, double gamma_max);

// ---- Data space. -----------------------------------------------------------
// uint8 pixels (any integer dtype) -> f = 2 (x + 0.5) / 256 - 1, float32.
at::Tensor ToModelSpace(const at::Tensor& x_uint8);
// The decoder's most likely pixel value for z_0 at gamma_0 [B]: the bin
// centre nearest to z_0 / alpha_0. Returns uint8.
at::Tensor DecodeMostLikely(const at::Tensor& z0, const at::Tensor& gamma0);
// x_hat in model space [-1, 1] -> nearest uint8 pixel value.
at::Tensor ToUint8(const at::Tensor& x);

// ---- Forward process: z_t = alpha_t f + sigma_t eps (gamma per row). ------
at::Tensor Diffuse(const at::Tensor& f, const at::Tensor& gamma,
                   const at::Tensor& eps);

// ---- Parameterizations. ----------------------------------------------------
// Converts a network output with prediction "eps", "v" or "x" into eps_hat.
// `prediction` must be one of those (checked by the model loader).
at::Tensor ToEps(const std::string& prediction, const at::Tensor& output,
                 const at::Tensor& z, const at::Tensor& gamma);
// x_hat = (z - sigma eps_hat) / alpha.
at::Tensor PredictX(const at::Tensor& z, const at::Tensor& gamma,
                    const at::Tensor& eps_hat);

// ---- VLB terms, in nats per image ([B]). ------------------------------------
// KL(q(z_1|x) || N(0, I)); gamma1 is [B] (or a 1-element tensor).
at::Tensor PriorKl(const at::Tensor& f, const at::Tensor& gamma1);
// -log p(x | z_0) with z0~ = f + exp(gamma0 / 2) eps0 and a 256-way softmax
// per dimension. x_uint8 holds the pixel values (integer dtype).
at::Tensor ReconstructionNll(const at::Tensor& x_uint8, const at::Tensor& gamma0,
                             const at::Tensor& eps0);
// Continuous time: 0.5 gamma'(t) ||eps - eps_hat||^2.
at::Tensor DiffusionLossContinuous(const at::Tensor& eps,
                                   const at::Tensor& eps_hat,
                                   const at::Tensor& dgamma_dt);
// Discrete time with T steps: 0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2.
at::Tensor DiffusionLossDiscrete(const at::Tensor& eps,
                                 const at::Tensor& eps_hat,
                                 const at::Tensor& gamma_t,
                                 const at::Tensor& gamma_s, int64_t steps);
// nats per image -> bits per dimension.
at::Tensor NatsToBpd(const at::Tensor& nats, int64_t dims);

// Stratified times t_k = (k + u) / K for k = 0..K-1, u in [0, 1): [K] f64.
at::Tensor StratifiedTimes(int64_t k, double u);

// ---- Samplers. -------------------------------------------------------------
// One DDIM(eta) step from t to s < t per row (docs/design.md, "The maths"):
// z_s = alpha_s x_hat + sqrt(sigma_s^2 - s2) eps_hat + sqrt(s2) xi,
// s2 = eta^2 sigma_s^2 c, c = -expm1(gamma_s - gamma_t). eta is per row [B]
// (or one element); eta = 1 is DDPM ancestral sampling. No clipping.
at::Tensor DdimStep(const at::Tensor& z_t, const at::Tensor& eps_hat,
                    const at::Tensor& gamma_t, const at::Tensor& gamma_s,
                    const at::Tensor& eta, const at::Tensor& xi);
// Classifier-free guidance: eps_u + scale (eps_c - eps_u), scale per row.
at::Tensor Guide(const at::Tensor& eps_uncond, const at::Tensor& eps_cond,
                 const at::Tensor& scale);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_DIFFUSION_H_
