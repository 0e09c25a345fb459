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
#include <iostream>
#include <string>
#include <vector>

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

// Per trajectory [n M], the exact log p_gamma(0)(z_0) and the ODE's, with
// the exact p_gamma(1) in place of N(0, I) (so only the solver and the trace
// estimator err).
struct Comparison {
  at::Tensor exact, ode;  // [n M] nats
};
Comparison Compare(OracleDenoiser& oracle, const OdeScores& s,
                   const at::Tensor& label) {
  const at::Tensor g = oracle.Gamma(at::tensor({0.0, 1.0}, at::kDouble))->gamma;
  const int64_t rows = s.z0.size(0);
  const at::Tensor row_label =
      label.repeat_interleave(rows / label.size(0));
  Comparison c;
  c.exact = oracle.LogMarginal(s.z0, g[0].expand({rows}), row_label);
  c.ode = oracle.LogMarginal(s.z1, g[1].expand({rows}), row_label) +
          s.divergence.reshape({-1});
  return c;
}

OdeOptions Rk4(int steps, Dequantization deq = Dequantization::kUniform) {
  OdeOptions o;
  o.solver = OdeSolver::kRk4;
  o.steps = steps;
  o.dequantization = deq;
  return o;
}

TEST(OdeLikelihoodTest, MatchesTheExactMarginalDensityAndConvergesWithSteps) {
  auto oracle = MakeOracle();
  at::Generator data = Gen(1);
  const at::Tensor x = oracle->Sample(6, 0, data);
  const at::Tensor label = at::zeros({6}, at::kLong);
  double previous = INFINITY;
  for (int steps : {16, 64}) {
    // Uniform dequantization starts between the bin centres, where the
    // posterior switches: the hard case for a fixed grid. Rademacher probes
    // are exact for the oracle's diagonal Jacobian.
    const OdeScores s = RunOde(*oracle, x, label, Rk4(steps), 7);
    EXPECT_EQ(s.evaluations[0].item<int64_t>(), 4 * steps);
    EXPECT_EQ(s.total_evaluations, 6 * 4 * steps);
    EXPECT_TRUE(std::isnan(s.solver_error_bpd[0].item<double>()));
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

TEST(OdeLikelihoodTest, AdaptiveSolveMeetsItsToleranceAndEstimatesItsError) {
  // Dormand-Prince on both dequantizations: the error against the exact
  // density falls with the tolerance, costs more evaluations when it is
  // tighter, and the solver's own estimate is of the error's size (not a
  // constant: it shrinks with the tolerance too).
  auto oracle = MakeOracle();
  at::Generator data = Gen(8);
  const at::Tensor x = oracle->Sample(6, 0, data);
  const at::Tensor label = at::zeros({6}, at::kLong);
  const double per_bpd = 1.0 / (16 * std::log(2.0));
  for (Dequantization deq :
       {Dequantization::kGaussian, Dequantization::kUniform}) {
    double loose_err = 0, loose_nfe = 0, loose_est = 0;
    for (double tol : {1e-2, 1e-5}) {
      OdeOptions o;
      o.rtol = o.atol = tol;
      o.dequantization = deq;
      o.max_evaluations = kMaxOdeEvaluations;
      const OdeScores s = RunOde(*oracle, x, label, o, 7);
      const Comparison c = Compare(*oracle, s, label);
      const double err = (c.ode - c.exact).abs().mean().item<double>();
      const double nfe = s.evaluations.to(at::kDouble).mean().item<double>();
      const double est = s.solver_error_bpd.mean().item<double>() / per_bpd;
      ASSERT_TRUE(at::isfinite(s.solver_error_bpd).all().item<bool>());
      // The trajectories take their own steps: an odd number of
      // evaluations is 1 + 6 per attempted step.
      EXPECT_EQ(s.evaluations.remainder(6).eq(1).all().item<bool>(), true);
      if (tol == 1e-2) {
        loose_err = err;
        loose_nfe = nfe;
        loose_est = est;
        continue;
      }
      // Tight: well under 0.05 nats per image of ~20-50 (measured 0.013).
      EXPECT_LT(err, 0.05) << "deq " << static_cast<int>(deq);
      EXPECT_LT(err, loose_err + 1e-9);
      EXPECT_GT(nfe, loose_nfe);
      EXPECT_LT(est, loose_est);
      // The estimate is the sum of the steps' local estimates: it misses
      // how errors grow along the flow, so it is below the error, but of
      // its order where the error is well above rounding (measured 0.1-0.3
      // of it at tolerance 1e-2).
      EXPECT_GT(loose_est, 0.03 * loose_err) << "deq " << static_cast<int>(deq);
      EXPECT_LT(loose_est, 3 * loose_err) << "deq " << static_cast<int>(deq);
    }
  }
}

TEST(OdeLikelihoodTest, ASolveAtItsEvaluationCapFinishesAndSaysSo) {
  auto oracle = MakeOracle();
  at::Generator data = Gen(9);
  const at::Tensor x = oracle->Sample(4, 0, data);
  const at::Tensor label = at::zeros({4}, at::kLong);
  OdeOptions o;
  o.rtol = o.atol = 1e-6;
  o.max_evaluations = kMinOdeEvaluations;
  const OdeScores capped = RunOde(*oracle, x, label, o, 3);
  EXPECT_LE(capped.evaluations.max().item<int64_t>(), kMinOdeEvaluations);
  EXPECT_TRUE(at::isfinite(capped.bpd).all().item<bool>());
  o.max_evaluations = kMaxOdeEvaluations;
  const OdeScores free = RunOde(*oracle, x, label, o, 3);
  EXPECT_GT(free.evaluations.min().item<int64_t>(), kMinOdeEvaluations);
  EXPECT_TRUE(at::isfinite(free.solver_error_bpd).all().item<bool>());
  // A solve forced past its tolerance by the cap says it did not converge.
  EXPECT_TRUE(at::isinf(capped.solver_error_bpd).all().item<bool>());
  EXPECT_GT((capped.bpd - free.bpd).abs().mean().item<double>(), 0.05);
}

TEST(OdeLikelihoodTest, GaussianProbesAreUnbiasedWithAnHonestStandardError) {
  // Class-conditional oracle scored without a label: the class posterior
  // couples the pixels, so the Jacobian is not diagonal. Each of the 16
  // solves of an image has its own start z_0; its error against the exact
  // density at that start is the trace estimator's alone.
  OracleOptions options;
  options.pmfs = {{0.7, 0.1, 0.1, 0.1}, {0.1, 0.1, 0.1, 0.7}};
  auto oracle = MakeOracle(options);
  at::Generator data = Gen(2);
  const at::Tensor x = at::cat({oracle->Sample(4, 0, data),
                                oracle->Sample(4, 1, data)});
  const at::Tensor label = at::full({8}, 2, at::kLong);  // no label
  auto run = [&](TraceProbe probe) {
    OdeOptions o;
    o.rtol = o.atol = 1e-5;
    o.trace_samples = 16;
    o.probe = probe;
    const OdeScores s = RunOde(*oracle, x, label, o, 11);
    const Comparison c = Compare(*oracle, s, label);
    return (c.ode - c.exact).reshape({8, 16});  // nats
  };
  const at::Tensor err = run(TraceProbe::kGaussian);
  const at::Tensor se = err.std(1) / 4.0;
  double chi2 = 0;
  for (int64_t i = 0; i < 8; ++i) {
    ASSERT_GT(se[i].item<double>(), 0);
    const double z = err[i].mean().item<double>() / se[i].item<double>();
    EXPECT_LT(std::abs(z), 4.5) << "image " << i;
    chi2 += z * z;
  }
  // Honest on average too: the mean squared z-score is about 1 (< 3 with
  // 8 images unless the estimate is biased).
  EXPECT_LT(chi2 / 8, 3.0);
  // Rademacher probes are far less noisy here.
  EXPECT_LT(run(TraceProbe::kRademacher).std(1).mean().item<double>(),
            err.std(1).mean().item<double>());
}

TEST(OdeLikelihoodTest, DequantizedBpdBoundsTheExactDiscreteNll) {
  // One image, many dequantization draws: the mean ODE BPD estimates
  // -E_u log2 p(x + u) / D, which is >= -log2 P(x) / D (Jensen), and equals
  // the exact expectation computed by quadrature over u pixel by pixel.
  auto oracle = MakeOracle();
  at::Generator data = Gen(3);
  const at::Tensor x = oracle->Sample(1, 0, data).repeat({24, 1, 1, 1});
  const at::Tensor label = at::zeros({24}, at::kLong);
  const OdeScores s = RunOde(*oracle, x, label, Rk4(64), 5);
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

// E over z_0 ~ q(z_0 | x) of -log p(x | z_0) + log q(z_0 | x) - log p_0(z_0)
// for one pixel of value `value` under the exact marginal p_0: the Gaussian
// dequantization's bound with an exact flow, by quadrature (nats).
double ExpectedGaussianBound(OracleDenoiser& pixel, int value) {
  const double g0 = pixel.options().gamma_min;
  const double alpha0 = std::sqrt(1.0 / (1.0 + std::exp(g0)));
  const double sigma0 = std::sqrt(1.0 / (1.0 + std::exp(-g0)));
  const int64_t nodes = 8001;
  const at::Tensor eps = at::linspace(-9.0, 9.0, nodes, at::kDouble);
  const at::Tensor w = at::exp(-0.5 * eps * eps) / std::sqrt(2 * M_PI) *
                       (18.0 / (nodes - 1));
  const double f = (2.0 * value + 1.0) / 256.0 - 1.0;
  const at::Tensor z0 = alpha0 * f + sigma0 * eps;
  const at::Tensor recon = ReconstructionNll(
      at::full({nodes, 1, 1, 1}, value, at::kByte),
      at::full({1}, g0, at::kDouble), eps.reshape({nodes, 1, 1, 1}));
  const at::Tensor log_q =
      -0.5 * eps * eps - std::log(sigma0) - 0.5 * std::log(2 * M_PI);
  const at::Tensor log_p0 = pixel.LogMarginal(
      z0.reshape({nodes, 1, 1, 1}), at::full({nodes}, g0, at::kDouble),
      at::zeros({nodes}, at::kLong));
  return ((recon + log_q - log_p0) * w).sum().item<double>();
}

TEST(OdeLikelihoodTest, GaussianDequantizationIsATightBoundOnTheOracle) {
  // The VDM's own q(z_0 | x) and decoder: E[-log p(x | z_0) + log q(z_0 |
  // x) - log p_0(z_0)] - (-log P(x)) = E KL(q(z_0 | x) || p(z_0 | x)) >= 0,
  // which is small when the decoder is sharp (sigma_0 is a sixth of a bin).
  // The ODE's estimate matches that expectation, and sits far below the
  // uniform dequantization's.
  auto oracle = MakeOracle();
  OracleOptions one;
  one.shape = {1, 1, 1};
  auto pixel = MakeOracle(one);
  const std::vector<int>& values = oracle->options().values;
  std::vector<double> bound(256, 0.0);
  for (int v : values) bound[v] = ExpectedGaussianBound(*pixel, v);
  at::Generator data = Gen(12);
  const int64_t n = 8;
  const at::Tensor x = oracle->Sample(n, 0, data);
  const at::Tensor label = at::zeros({n}, at::kLong);
  const at::Tensor nll = oracle->ExactNll(x, label);  // [n] nats
  at::Tensor expected = at::zeros({n}, at::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor px = x[i].reshape({-1}).to(at::kLong);
    double sum = 0;
    for (int64_t k = 0; k < px.size(0); ++k) {
      sum += bound[px[k].item<int64_t>()];
    }
    expected[i] = sum;
  }
  // The gap: positive, and under 1% of the NLL (about 0.3% per pixel).
  const at::Tensor gap = expected - nll;
  EXPECT_GT(gap.min().item<double>(), 0);
  EXPECT_LT((gap / nll).max().item<double>(), 0.01);
  // The ODE's bound with the exact p_gamma(1): its mean over 4 draws per
  // image against the quadrature, within 4 standard errors of the draws.
  OdeOptions o;
  o.trace_samples = 4;
  const OdeScores s = RunOde(*oracle, x, label, o, 13);
  const Comparison c = Compare(*oracle, s, label);
  const at::Tensor ode_bound =
      (s.dequantization.reshape({-1}) - c.ode).reshape({n, 4});
  const double diff =
      (ode_bound.mean(1) - expected).mean().item<double>();
  const double se = (ode_bound - expected.unsqueeze(1)).std().item<double>() /
                    std::sqrt(4.0 * n);
  EXPECT_LT(std::abs(diff), 4 * se + 0.05) << "se " << se;
  // The served value (N(0, I) prior) is the bound too, up to the prior's
  // small mismatch; uniform dequantization is far looser on this data.
  const double d = 16, ln2 = std::log(2.0);
  const double nll_bpd = nll.mean().item<double>() / (d * ln2);
  const double gaussian_bpd = s.bpd.mean().item<double>();
  OdeOptions u = o;
  u.dequantization = Dequantization::kUniform;
  const double uniform_bpd = RunOde(*oracle, x, label, u, 13).bpd.mean().item<double>();
  EXPECT_NEAR(gaussian_bpd, nll_bpd, 0.05);
  EXPECT_GT(uniform_bpd, gaussian_bpd + 0.5);
}

TEST(OdeLikelihoodTest, PlanIsDeterministicAndRefusesBadOptions) {
  auto oracle = MakeOracle();
  at::Generator data = Gen(4);
  const at::Tensor x = oracle->Sample(3, 0, data);
  const at::Tensor label = at::zeros({3}, at::kLong);
  OdeOptions o;
  o.trace_samples = 2;
  // Any chunking of the rows gives the same result, for either solver.
  for (OdeSolver solver : {OdeSolver::kDormandPrince, OdeSolver::kRk4}) {
    o.solver = solver;
    o.steps = 4;
    auto a = OdeLikelihood(*oracle, x, label, o, Gen(9), 1);
    auto b = OdeLikelihood(*oracle, x, label, o, Gen(9), 4096);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_TRUE(at::allclose(a->bpd, b->bpd, 1e-9, 1e-9));
    EXPECT_TRUE(at::equal(a->evaluations, b->evaluations));
    EXPECT_FALSE(std::isnan(a->stderr_bpd[0].item<double>()));
  }
  o = OdeOptions();
  auto one = OdeLikelihood(*oracle, x, label, o, Gen(9), 64);
  ASSERT_TRUE(one.ok());
  EXPECT_TRUE(std::isnan(one->stderr_bpd[0].item<double>()));
  auto refused = [&](OdeOptions bad, const char* field) {
    auto r = OdeLikelihood(*oracle, x, label, bad, Gen(9), 64);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(r.status().message().find(field), std::string::npos)
        << r.status();
  };
  OdeOptions bad = Rk4(0);
  refused(bad, "ode_steps");
  bad = OdeOptions();
  bad.rtol = 0;
  refused(bad, "ode_rtol");
  bad = OdeOptions();
  bad.atol = NAN;
  refused(bad, "ode_atol");
  bad = OdeOptions();
  bad.max_evaluations = kMinOdeEvaluations - 1;
  refused(bad, "ode_max_evaluations");
  bad = OdeOptions();
  bad.trace_samples = kMaxTraceSamples + 1;
  refused(bad, "trace_samples");
  // A Denoiser without VJPs says so.
  ParameterizedOracle plain(oracle.get(), "eps");
  auto r = OdeLikelihood(plain, x, label, OdeOptions(), Gen(9), 64);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
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
    OdeOptions o = Rk4(2, Dequantization::kGaussian);
    o.trace_samples = 2;
    auto s = OdeLikelihood(**model, x, label, o, Gen(1), 64);
    ASSERT_TRUE(s.ok()) << s.status();
    EXPECT_TRUE(at::isfinite(s->bpd).all().item<bool>());
    EXPECT_EQ(s->evaluations[0].item<int64_t>(), 8);
  }
}

}  // namespace
}  // namespace vdm
