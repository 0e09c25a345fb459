// The learned noise schedule (model/train/schedule.h): parameter names, and
// that the variance gradient lowers the variance of the diffusion loss
// estimator, on the exact oracle (model/vdm/testing/oracle.h), whose
// optimal eps_hat(z, gamma) is known for any schedule.
#include "model/train/schedule.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/optim/adam.h>
#include <torch/script.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/testing/oracle.h"
#include "model/vdm/torchscript_model.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

std::string ModelPath(const std::string& name) {
  return std::string(VDM_TEST_MODELS_DIR) + "/" + name;
}

TEST(ScheduleTest, ParsesTheKindsAndRefusesOthers) {
  for (ScheduleKind kind : {ScheduleKind::kFixed,
                            ScheduleKind::kLearnedEndpoints,
                            ScheduleKind::kLearned}) {
    auto parsed = ParseSchedule(ScheduleName(kind));
    ASSERT_TRUE(parsed.ok());
    EXPECT_EQ(*parsed, kind);
  }
  auto bad = ParseSchedule("cosine");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("cosine"));
}

TEST(ScheduleTest, FindsTheScheduleParametersByName) {
  torch::jit::Module module = torch::jit::load(ModelPath("tiny_learned.pt"));
  std::vector<std::string> endpoints, shape;
  int others = 0;
  for (const auto& p : module.named_parameters()) {
    if (IsScheduleEndpoint(p.name)) {
      endpoints.push_back(p.name);
    } else if (IsScheduleShape(p.name)) {
      shape.push_back(p.name);
    } else {
      ++others;
    }
  }
  EXPECT_THAT(endpoints, ::testing::ElementsAre("gamma_min", "gamma_max"));
  EXPECT_EQ(shape.size(), 5u);
  EXPECT_GT(others, 10);
  EXPECT_FALSE(IsScheduleEndpoint("emb_in.weight"));
  EXPECT_FALSE(IsScheduleEndpoint("gamma_net.l1_weight"));
}

// Per-row diffusion losses 0.5 gamma'(t) ||eps - eps_hat||^2 (nats) of the
// oracle's data and its optimal eps_hat, at i.i.d. uniform times, under the
// module's schedule, differentiable w.r.t. its parameters in grad mode. With
// `graph`, the loss sees gamma through leaves (as in training) and `graph`
// keeps gamma's graph.
at::Tensor OracleLosses(torch::jit::Module& module, OracleDenoiser& oracle,
                        int64_t n, uint64_t seed, ScheduleGraph* graph,
                        bool antithetic = false) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const at::Tensor x = oracle.Sample(n, 0, gen);
  at::Tensor t = at::rand({n}, gen, at::TensorOptions(at::kFloat));
  if (antithetic) {  // as vdm-train: t_i = (u + i / n) mod 1
    t = at::fmod(at::arange(n, at::kFloat) / n + t[0], 1.0);
  }
  const at::Tensor eps =
      at::randn(x.sizes(), gen, at::TensorOptions(at::kFloat));
  auto g = GammaWithDerivative(module, t, torch::kCPU,
                               at::GradMode::is_enabled());
  EXPECT_TRUE(g.ok()) << g.status();
  GammaValues used = *g;
  if (graph != nullptr) {
    graph->graph = *g;
    graph->gamma_leaf = g->gamma.detach().requires_grad_(true);
    graph->dgamma_leaf = g->dgamma_dt.detach().requires_grad_(true);
    used = GammaValues{graph->gamma_leaf, graph->dgamma_leaf};
  }
  const at::Tensor z = Diffuse(ToModelSpace(x), used.gamma, eps);
  const at::Tensor eps_hat =
      oracle.OptimalEps(z, used.gamma, at::zeros({n}, at::kLong))
          .to(at::kFloat);
  return DiffusionLossContinuous(eps, eps_hat, used.dgamma_dt);
}

// The diffusion loss of the exact denoiser given t, averaged over the noise
// and the data: E[L | t] = 0.5 gamma'(t) D sum_j p_j mmse_j(gamma(t)), with
// the oracle's per-value MMSE by quadrature (PixelMmse), at n times
// (antithetic, as in training, or i.i.d.). Its spread over t is the part of
// the estimator's variance that the schedule's shape sets (the VLB, its
// mean, depends on the endpoints only).
at::Tensor OracleLossGivenT(torch::jit::Module& module, OracleDenoiser& oracle,
                            int64_t n, uint64_t seed, ScheduleGraph* graph,
                            bool antithetic) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor t = at::rand({n}, gen, at::TensorOptions(at::kFloat));
  if (antithetic) t = at::fmod(at::arange(n, at::kFloat) / n + t[0], 1.0);
  auto g = GammaWithDerivative(module, t, torch::kCPU,
                               at::GradMode::is_enabled());
  EXPECT_TRUE(g.ok()) << g.status();
  GammaValues used = *g;
  if (graph != nullptr) {
    graph->graph = *g;
    graph->gamma_leaf = g->gamma.detach().requires_grad_(true);
    graph->dgamma_leaf = g->dgamma_dt.detach().requires_grad_(true);
    used = GammaValues{graph->gamma_leaf, graph->dgamma_leaf};
  }
  const at::Tensor pmf =
      at::tensor(oracle.options().pmfs[0], at::kDouble).reshape({-1, 1});
  const at::Tensor mmse = (oracle.PixelMmse(used.gamma, 0) * pmf).sum(0);
  return (0.5 * oracle.shape().dims()) * used.dgamma_dt.to(at::kDouble) * mmse;
}

// A few Adam steps on the shape by VarianceGradient, endpoints fixed: the
// variance over t of the exact loss falls, its mean (the VLB's diffusion
// term) stays, and gamma stays monotone with its endpoints.
TEST(ScheduleTest, VarianceGradientLowersTheEstimatorsVarianceOnTheOracle) {
  auto oracle = OracleDenoiser::Create(OracleOptions{});
  ASSERT_TRUE(oracle.ok()) << oracle.status();
  torch::jit::Module module = torch::jit::load(ModelPath("tiny_learned.pt"));
  std::vector<at::Tensor> shape;
  for (const auto& p : module.named_parameters()) {
    if (IsScheduleShape(p.name)) {
      shape.push_back(p.value);
    } else {
      p.value.requires_grad_(false);  // the network and the endpoints
    }
  }
  ASSERT_EQ(shape.size(), 5u);
  constexpr int64_t kEval = 4096;
  auto measure = [&](double& mean, double& var) {
    torch::NoGradGuard no_grad;
    // i.i.d. times, fixed seed: the same draws before and after.
    const at::Tensor l =
        OracleLossGivenT(module, **oracle, kEval, 12345, nullptr, false);
    mean = l.mean().item<double>();
    var = l.var().item<double>();
  };
  double mean0 = 0, var0 = 0;
  measure(mean0, var0);

  torch::optim::Adam adam(shape, torch::optim::AdamOptions(0.1));
  for (int step = 0; step < 60; ++step) {
    ScheduleGraph graph;
    at::Tensor rows =
        OracleLossGivenT(module, **oracle, 256, 100 + step, &graph, true);
    // As in training: the mean loss's backward stops at the leaves; the
    // shape takes the gradient of the mean squared loss.
    rows.mean().backward();
    std::vector<at::Tensor> grads = VarianceGradient(graph, rows, shape);
    ASSERT_EQ(grads.size(), shape.size());
    for (size_t i = 0; i < shape.size(); ++i) {
      ASSERT_TRUE(at::isfinite(grads[i]).all().item<bool>());
      shape[i].mutable_grad() = grads[i];
    }
    adam.step();
  }
  double mean1 = 0, var1 = 0;
  measure(mean1, var1);
  std::printf("variance over t of E[L|t]: %.1f -> %.1f nats^2; mean %.3f -> "
              "%.3f nats\n", var0, var1, mean0, mean1);
  EXPECT_LT(var1, 0.7 * var0) << "variance " << var0 << " -> " << var1;
  // The same integral: the mean moves by its Monte Carlo error at most.
  const double se = std::sqrt((var0 + var1) / kEval);
  EXPECT_NEAR(mean1, mean0, 4 * se) << "mean " << mean0 << " -> " << mean1;
  EXPECT_TRUE(CheckGammaMonotone(module, torch::kCPU).ok());
  auto ends = GammaWithDerivative(module, at::tensor({0.0f, 1.0f}),
                                  torch::kCPU, false);
  ASSERT_TRUE(ends.ok());
  EXPECT_FLOAT_EQ(ends->gamma[0].item<float>(), -13.3f);
  EXPECT_FLOAT_EQ(ends->gamma[1].item<float>(), 5.0f);
}

// VarianceGradient is the gradient of mean(L^2): compare with autograd
// through the whole loss (the slow way, two passes) on a small batch.
TEST(ScheduleTest, VarianceGradientIsTheGradientOfTheMeanSquaredLoss) {
  auto oracle = OracleDenoiser::Create(OracleOptions{});
  ASSERT_TRUE(oracle.ok()) << oracle.status();
  torch::jit::Module module = torch::jit::load(ModelPath("tiny_learned.pt"));
  std::vector<at::Tensor> shape;
  for (const auto& p : module.named_parameters()) {
    if (IsScheduleShape(p.name)) {
      shape.push_back(p.value);
    } else {
      p.value.requires_grad_(false);
    }
  }
  ScheduleGraph graph;
  at::Tensor rows = OracleLosses(module, **oracle, 64, 7, &graph);
  rows.mean().backward();
  std::vector<at::Tensor> fast = VarianceGradient(graph, rows, shape);
  // Direct: the same draws without leaves, d mean(L^2) / d shape.
  at::Tensor l2 = OracleLosses(module, **oracle, 64, 7, nullptr);
  ASSERT_TRUE(at::allclose(l2.detach(), rows.detach()));
  std::vector<at::Tensor> slow = torch::autograd::grad(
      {l2.pow(2).mean()}, shape, {}, false, false, true);
  ASSERT_EQ(fast.size(), slow.size());
  for (size_t i = 0; i < fast.size(); ++i) {
    ASSERT_TRUE(slow[i].defined());
    EXPECT_TRUE(at::allclose(fast[i], slow[i], 1e-3, 1e-6))
        << "parameter " << i << ": max difference "
        << (fast[i] - slow[i]).abs().max().item<double>();
  }
}

}  // namespace
}  // namespace vdm
