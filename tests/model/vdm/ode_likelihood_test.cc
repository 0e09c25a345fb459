// The probability-flow ODE likelihood (model/vdm/ode_likelihood.h) against
// the exact oracle (oracle.h): with the optimal eps_hat the ODE transports
// the exact marginal p_gamma(0) to p_gamma(1), so log p_0(z_0) from the ODE
// must equal the closed-form mixture density OracleDenoiser::LogMarginal up
// to the solver's error (and, with Gaussian probes, the trace estimator's
// Monte Carlo error, which the reported standard error must cover).
#include "model/vdm/ode_likelihood.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "model/vdm/diffusion.h"
#include "model/vdm/testing/oracle.h"
#include "model/vdm/torchscript_model.h"

namespace vdm {
namespace {

std::unique_ptr<OracleDenoiser> MakeOracle(OracleOptions o = {}) {
  auto oracle = OracleDenoiser::Create(o);
  EXPECT_TRUE(oracle.ok()) << oracle.status();
  return std::move(oracle).value();
}

at::Generator Gen(uint64_t seed) {
  return at::make_generator<at::CPUGeneratorImpl>(seed);
}

OdeScores RunOde(Denoiser& model, const at::Tensor& x, const at::Tensor& label,
              OdeOptions o, uint64_t seed) {
  auto s = OdeLikelihood(model, x, label, o, Gen(seed), 4096);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(s).value();
}

// The exact log p_gamma(0)(z_0) and the ODE's, with the exact p_gamma(1)
// in place of N(0, I) (so only the solver and the trace estimator err).
struct Comparison {
  at::Tensor exact, ode;  // [n] nats
};
Comparison Compare(OracleDenoiser& oracle, const OdeScores& s,
                   const at::Tensor& label) {
  const at::Tensor g = oracle.Gamma(at::tensor({0.0, 1.0}, at::kDouble))->gamma;
  const int64_t n = s.z0.size(0);
  Comparison c;
  c.exact = oracle.LogMarginal(s.z0, g[0].expand({n}), label);
  c.ode = oracle.LogMarginal(s.z1, g[1].expand({n}), label) +
          s.divergence.mean(1);
  return c;
}

TEST(OdeLikelihoodTest, MatchesTheExactMarginalDensityAndConvergesWithSteps) {
  auto oracle = MakeOracle();
  at::Generator data = Gen(1);
  const at::Tensor x = oracle->Sample(6, 0, data);
  const at::Tensor label = at::zeros({6}, at::kLong);
  double previous = INFINITY;
  for (int steps : {16, 64}) {
    OdeOptions o;
    o.steps = steps;  // Rademacher probes: exact for the diagonal Jacobian
    const OdeScores s = RunOde(*oracle, x, label, o, 7);
    EXPECT_EQ(s.function_evaluations, 4 * steps);
    const Comparison c = Compare(*oracle, s, label);
    const double err = (c.ode - c.exact).abs().max().item<double>();
    // ~47 nats per image; RK4 converges at 4th order once the steps
    // resolve the posterior switching (4 nats at 16 steps, 0.4 at 32, 0.03 at
    // 64, 0.001 at 128).
    EXPECT_LT(err, steps == 64 ? 0.05 : 6.0) << "steps " << steps;
    EXPECT_LT(err, previous);
    previous = err;
  }
}

TEST(OdeLikelihoodTest, GaussianProbesAreUnbiasedWithAnHonestStandardError) {
  // Class-conditional oracle scored without a label: the class posterior
  // couples the pixels, so the Jacobian is not diagonal.
  OracleOptions options;
  options.pmfs = {{0.7, 0.1, 0.1, 0.1}, {0.1, 0.1, 0.1, 0.7}};
  auto oracle = MakeOracle(options);
  at::Generator data = Gen(2);
  const at::Tensor x = at::cat({oracle->Sample(4, 0, data),
                                oracle->Sample(4, 1, data)});
  const at::Tensor label = at::full({8}, 2, at::kLong);  // no label
  OdeOptions o;
  o.steps = 64;
  o.trace_samples = 16;
  o.probe = TraceProbe::kGaussian;
  const OdeScores s = RunOde(*oracle, x, label, o, 11);
  const Comparison c = Compare(*oracle, s, label);
  const double per_bpd = 1.0 / (16 * std::log(2.0));
  double chi2 = 0;
  for (int64_t i = 0; i < 8; ++i) {
    const double se = s.stderr_bpd[i].item<double>() / per_bpd;  // nats
    ASSERT_GT(se, 0);
    const double z = (c.ode[i].item<double>() - c.exact[i].item<double>()) / se;
    EXPECT_LT(std::abs(z), 4.5) << "image " << i;
    chi2 += z * z;
  }
  // Honest on average too: the mean squared z-score is about 1 (< 3 with
  // 8 images unless the standard error is too small).
  EXPECT_LT(chi2 / 8, 3.0);
  // Rademacher probes are far less noisy here.
  o.probe = TraceProbe::kRademacher;
  const OdeScores r = RunOde(*oracle, x, label, o, 11);
  EXPECT_LT(r.stderr_bpd.mean().item<double>(),
            s.stderr_bpd.mean().item<double>());
}

TEST(OdeLikelihoodTest, DequantizedBpdBoundsTheExactDiscreteNll) {
  // One image, many dequantization draws: the mean ODE BPD estimates
  // -E_u log2 p(x + u) / D, which is >= -log2 P(x) / D (Jensen), and equals
  // the exact expectation computed by quadrature over u pixel by pixel.
  auto oracle = MakeOracle();
  at::Generator data = Gen(3);
  const at::Tensor x = oracle->Sample(1, 0, data).repeat({24, 1, 1, 1});
  const at::Tensor label = at::zeros({24}, at::kLong);
  OdeOptions o;
  o.steps = 64;
  const OdeScores s = RunOde(*oracle, x, label, o, 5);
  const double d = 16, ln2 = std::log(2.0);
  const double nll_bpd =
      oracle->ExactNll(x.narrow(0, 0, 1), label.narrow(0, 0, 1)).item<double>() /
      (d * ln2);
  // Quadrature: pixels are independent; E_u log p(x_i + u) on 4000 nodes.
  OracleOptions one;
  one.shape = {1, 1, 1};
  auto pixel = MakeOracle(one);
  const double g0 = oracle->options().gamma_min;
  const double alpha0 = std::sqrt(1.0 / (1.0 + std::exp(g0)));
  const at::Tensor u = (at::arange(4000, at::kDouble) + 0.5) / 4000;
  double expected_log_p = 0;  // nats, of y = x + u in [0, 256)^D
  const at::Tensor xs = x[0].reshape({-1}).to(at::kDouble);
  for (int64_t i = 0; i < 16; ++i) {
    const at::Tensor z =
        alpha0 * (2.0 * (xs[i] + u) / 256.0 - 1.0);
    expected_log_p +=
        pixel->LogMarginal(z.reshape({-1, 1, 1, 1}),
                           at::full({4000}, g0, at::kDouble),
                           at::zeros({4000}, at::kLong))
            .mean()
            .item<double>() +
        std::log(2.0 * alpha0 / 256.0);
  }
  const double exact_bpd = -expected_log_p / (d * ln2);
  const double mean = s.bpd.mean().item<double>();
  const double se = s.bpd.std().item<double>() / std::sqrt(24.0);
  EXPECT_GT(exact_bpd, nll_bpd);
  // N(0, I) in place of p_1 adds the prior's small mismatch (0.02 bpd).
  EXPECT_NEAR(mean, exact_bpd, 4 * se + 0.03);
  EXPECT_GT(mean, nll_bpd);
}

TEST(OdeLikelihoodTest, PlanIsDeterministicAndRefusesBadOptions) {
  auto oracle = MakeOracle();
  at::Generator data = Gen(4);
  const at::Tensor x = oracle->Sample(3, 0, data);
  const at::Tensor label = at::zeros({3}, at::kLong);
  OdeOptions o;
  o.steps = 4;
  o.trace_samples = 2;
  // Any chunking of the rows gives the same result.
  auto a = OdeLikelihood(*oracle, x, label, o, Gen(9), 1);
  auto b = OdeLikelihood(*oracle, x, label, o, Gen(9), 4096);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_TRUE(at::allclose(a->bpd, b->bpd, 1e-9, 1e-9));
  EXPECT_FALSE(std::isnan(a->stderr_bpd[0].item<double>()));
  o.trace_samples = 1;
  auto one = OdeLikelihood(*oracle, x, label, o, Gen(9), 64);
  ASSERT_TRUE(one.ok());
  EXPECT_TRUE(std::isnan(one->stderr_bpd[0].item<double>()));
  o.steps = 0;
  auto bad = OdeLikelihood(*oracle, x, label, o, Gen(9), 64);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("ode_steps"), std::string::npos);
  o.steps = 4;
  o.trace_samples = kMaxTraceSamples + 1;
  bad = OdeLikelihood(*oracle, x, label, o, Gen(9), 64);
  EXPECT_NE(bad.status().message().find("trace_samples"), std::string::npos);
  // A Denoiser without VJPs says so.
  ParameterizedOracle plain(oracle.get(), "eps");
  o.trace_samples = 1;
  bad = OdeLikelihood(plain, x, label, o, Gen(9), 64);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kUnimplemented);
}

std::string ModelPath(const std::string& name) {
  return std::string(VDM_TEST_MODELS_DIR) + "/" + name;
}

TEST(OdeLikelihoodTest, TorchScriptVjpIsLinearPerRowAndMatchesDenoise) {
  // The untrained test networks are too rough for float32 finite
  // differences (their Jacobians reach 1e4; in float64 central differences
  // agree with autograd to 0.1%), so this checks what the engine relies on:
  // eps equals Denoise's, the product is linear in v, and a row's product
  // does not depend on the other rows of the batch.
  for (const char* name : {"tiny.pt", "tiny_uncond_v.pt"}) {
    auto model = TorchScriptModel::Load({ModelPath(name)});
    ASSERT_TRUE(model.ok()) << model.status();
    const ImageShape sh = (*model)->shape();
    at::Generator gen = Gen(5);
    const at::Tensor z =
        at::randn({2, sh.channels, sh.height, sh.width}, gen, at::kFloat);
    const at::Tensor v = at::randn(z.sizes(), gen, at::kFloat);
    const at::Tensor w = at::randn(z.sizes(), gen, at::kFloat);
    const at::Tensor gamma = at::tensor({-2.0f, 1.0f});
    const at::Tensor label = at::full({2}, (*model)->num_classes(), at::kLong);
    auto out = (*model)->DenoiseVjp(z, gamma, label, v);
    ASSERT_TRUE(out.ok()) << out.status();
    auto eps = (*model)->Denoise(z, gamma, label);
    ASSERT_TRUE(eps.ok());
    EXPECT_TRUE(at::allclose(out->eps, *eps, 1e-5, 1e-5)) << name;
    auto vw = (*model)->DenoiseVjp(z, gamma, label, 2 * v + w);
    auto ww = (*model)->DenoiseVjp(z, gamma, label, w);
    ASSERT_TRUE(vw.ok() && ww.ok());
    const double scale = out->vjp.abs().max().item<double>();
    EXPECT_LT((vw->vjp - 2 * out->vjp - ww->vjp).abs().max().item<double>(),
              1e-4 * scale) << name;
    auto row1 = (*model)->DenoiseVjp(z.narrow(0, 1, 1), gamma.narrow(0, 1, 1),
                                     label.narrow(0, 1, 1), v.narrow(0, 1, 1));
    ASSERT_TRUE(row1.ok());
    EXPECT_TRUE(at::allclose(row1->vjp, out->vjp.narrow(0, 1, 1), 1e-4,
                             1e-4 * scale)) << name;
    EXPECT_GT(scale, 0);
    // And the plan runs end to end on the network.
    const at::Tensor x = at::randint(
        0, 256, {2, sh.channels, sh.height, sh.width}, gen, at::kByte);
    OdeOptions o;
    o.steps = 2;
    o.trace_samples = 2;
    auto s = OdeLikelihood(**model, x, label, o, Gen(1), 64);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(at::isfinite(s->bpd).all().item<bool>());
    EXPECT_EQ(s->function_evaluations, 8);
  }
}

}  // namespace
}  // namespace vdm
