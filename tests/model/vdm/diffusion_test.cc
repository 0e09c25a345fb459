// Tests of the VDM maths (model/vdm/diffusion.h) against hand computations
// and the independent float64 test vectors in tests/testdata/vdm_vectors.json.
#include "model/vdm/diffusion.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

namespace vdm {
namespace {

using nlohmann::json;

json LoadVectors() {
  std::ifstream in(std::string(VDM_TESTDATA_DIR) + "/vdm_vectors.json");
  EXPECT_TRUE(in.good()) << "missing tests/testdata/vdm_vectors.json";
  return json::parse(in);
}

// Flattens a nested JSON array of numbers and records its shape.
void Flatten(const json& j, std::vector<double>* out, std::vector<int64_t>* shape,
             size_t depth = 0) {
  if (!j.is_array()) {
    out->push_back(j.get<double>());
    return;
  }
  if (shape->size() <= depth) shape->push_back(static_cast<int64_t>(j.size()));
  for (const auto& e : j) Flatten(e, out, shape, depth + 1);
}

at::Tensor ToTensor(const json& j) {
  std::vector<double> v;
  std::vector<int64_t> shape;
  Flatten(j, &v, &shape);
  return at::tensor(v, at::kDouble).reshape(shape);
}

TEST(DiffusionTest, ScheduleIsAVariancePreservingPair) {
  const at::Tensor g = at::linspace(-13.3, 5.0, 50, at::kDouble);
  EXPECT_TRUE(at::allclose(AlphaSquared(g) + SigmaSquared(g),
                           at::ones_like(g)));
  // SNR = alpha^2 / sigma^2 = exp(-gamma).
  EXPECT_TRUE(at::allclose(AlphaSquared(g) / SigmaSquared(g), at::exp(-g)));
}

TEST(DiffusionTest, ForwardProcessMomentsMatchTheSchedule) {
  at::manual_seed(1);
  const int64_t n = 200000;
  const at::Tensor f = at::full({n, 1, 1, 1}, 0.6, at::kDouble);
  const at::Tensor gamma = at::full({n}, -1.5, at::kDouble);
  const at::Tensor z = Diffuse(f, gamma, at::randn({n, 1, 1, 1}, at::kDouble));
  const double alpha = std::sqrt(1.0 / (1.0 + std::exp(-1.5)));
  const double sigma2 = 1.0 / (1.0 + std::exp(1.5));
  // Standard errors: sqrt(sigma2 / n) ~ 0.001 for the mean.
  EXPECT_NEAR(z.mean().item<double>(), alpha * 0.6, 0.005);
  EXPECT_NEAR(z.var().item<double>(), sigma2, 0.005);
}

TEST(DiffusionTest, PriorKlMatchesHandComputation) {
  // One image of two pixels, f = {0.5, -1}, gamma1 = 5.
  const at::Tensor f = at::tensor({0.5, -1.0}, at::kDouble).reshape({1, 1, 1, 2});
  const double s2 = 1.0 / (1.0 + std::exp(-5.0));
  double expected = 0;
  for (double v : {0.5, -1.0}) {
    expected += 0.5 * ((1 - s2) * v * v + s2 - std::log(s2) - 1);
  }
  const at::Tensor kl = PriorKl(f, at::tensor({5.0}, at::kDouble));
  EXPECT_NEAR(kl.item<double>(), expected, 1e-12);
}

TEST(DiffusionTest, ReconstructionDistributionSumsToOne) {
  // For a fixed z0, sum_x p(x | z0) over all 256 values must be 1. Use one
  // pixel: eps0 chosen so z0 is the same for every x.
  const double gamma0 = -6.0;
  const double z0 = 0.1234;
  double total = 0;
  for (int x = 0; x < 256; ++x) {
    const double f = 2 * (x + 0.5) / 256 - 1;
    const double eps0 = (z0 - f) / std::exp(gamma0 / 2);
    const at::Tensor nll = ReconstructionNll(
        at::tensor({x}, at::kLong).reshape({1, 1, 1, 1}),
        at::tensor({gamma0}, at::kDouble),
        at::tensor({eps0}, at::kDouble).reshape({1, 1, 1, 1}));
    total += std::exp(-nll.item<double>());
  }
  EXPECT_NEAR(total, 1.0, 1e-9);
}

TEST(DiffusionTest, VlbTermsMatchTestVectors) {
  const json vectors = LoadVectors();
  ASSERT_GE(vectors["vlb"].size(), 2u);
  for (const json& c : vectors["vlb"]) {
    const double gmin = c["gamma_min"], gmax = c["gamma_max"];
    const at::Tensor x = ToTensor(c["x_uint8"]).to(at::kLong);
    const at::Tensor f = ToModelSpace(x).to(at::kDouble);
    const at::Tensor t = ToTensor(c["t"]);
    const at::Tensor eps = ToTensor(c["eps"]);
    const at::Tensor eps0 = ToTensor(c["eps0"]);
    const int64_t b = x.size(0);
    const at::Tensor gamma_t = LinearGamma(t, gmin, gmax);
    const at::Tensor z_t = Diffuse(f, gamma_t, eps);
    EXPECT_TRUE(at::allclose(z_t, ToTensor(c["z_t"]), 1e-9, 1e-12));
    const at::Tensor eps_hat = 0.5 * z_t;  // the vectors' "network"
    const at::Tensor prior = PriorKl(f, at::full({b}, gmax, at::kDouble));
    const at::Tensor recon =
        ReconstructionNll(x, at::full({b}, gmin, at::kDouble), eps0);
    const at::Tensor diff = DiffusionLossContinuous(
        eps, eps_hat, at::full({b}, gmax - gmin, at::kDouble));
    const json& want = c["expected_nats"];
    for (int64_t i = 0; i < b; ++i) {
      EXPECT_NEAR(prior[i].item<double>(), want["prior"][i].get<double>(),
                  1e-9);
      EXPECT_NEAR(recon[i].item<double>(),
                  want["reconstruction"][i].get<double>(), 1e-7);
      EXPECT_NEAR(diff[i].item<double>(), want["diffusion"][i].get<double>(),
                  1e-8);
    }
    const at::Tensor bpd = NatsToBpd(prior + recon + diff, f[0].numel());
    for (int64_t i = 0; i < b; ++i) {
      EXPECT_NEAR(bpd[i].item<double>(),
                  c["expected_bpd_total"][i].get<double>(), 1e-8);
    }
  }
}

TEST(DiffusionTest, DdimStepMatchesTestVectors) {
  const json vectors = LoadVectors();
  ASSERT_GE(vectors["ddim_step"].size(), 3u);
  for (const json& c : vectors["ddim_step"]) {
    const at::Tensor z_s = DdimStep(
        ToTensor(c["z_t"]), ToTensor(c["eps_hat"]), ToTensor(c["gamma_t"]),
        ToTensor(c["gamma_s"]), at::tensor({c["eta"].get<double>()}, at::kDouble),
        ToTensor(c["xi"]));
    EXPECT_TRUE(at::allclose(z_s, ToTensor(c["expected_z_s"]), 1e-10, 1e-12))
        << "eta=" << c["eta"];
  }
}

TEST(DiffusionTest, DdimWithEtaOneIsTheAncestralStep) {
  // Ancestral DDPM: z_s ~ q(z_s | z_t, x = x_hat) with mean
  // alpha_s x_hat + (sigma_s^2 - var) / sigma_t ... written in VDM form:
  // mu = alpha_s/alpha_t * (z_t + sigma_t expm1(gamma_s - gamma_t) eps_hat),
  // var = sigma_s^2 * c, c = -expm1(gamma_s - gamma_t).
  at::manual_seed(3);
  const at::Tensor z = at::randn({3, 1, 2, 2}, at::kDouble);
  const at::Tensor eps_hat = at::randn({3, 1, 2, 2}, at::kDouble);
  const at::Tensor xi = at::randn({3, 1, 2, 2}, at::kDouble);
  const at::Tensor gt = at::tensor({2.0, -1.0, 4.5}, at::kDouble);
  const at::Tensor gs = at::tensor({1.0, -3.0, 4.0}, at::kDouble);
  const at::Tensor r = [](at::Tensor v) { return v.reshape({3, 1, 1, 1}); }(gt);
  const at::Tensor q = gs.reshape({3, 1, 1, 1});
  const at::Tensor alpha_t = at::sqrt(at::sigmoid(-r));
  const at::Tensor alpha_s = at::sqrt(at::sigmoid(-q));
  const at::Tensor sigma_t = at::sqrt(at::sigmoid(r));
  const at::Tensor c = -at::expm1(q - r);
  const at::Tensor mu =
      alpha_s / alpha_t * (z + sigma_t * at::expm1(q - r) * eps_hat);
  const at::Tensor var = at::sigmoid(q) * c;
  const at::Tensor expected = mu + at::sqrt(var) * xi;
  const at::Tensor got =
      DdimStep(z, eps_hat, gt, gs, at::ones({1}, at::kDouble), xi);
  EXPECT_TRUE(at::allclose(got, expected, 1e-10, 1e-12));
}

TEST(DiffusionTest, ParameterizationsConvertToTheSameEps) {
  at::manual_seed(4);
  const at::Tensor x = at::rand({2, 1, 3, 3}, at::kDouble) * 2 - 1;
  const at::Tensor eps = at::randn({2, 1, 3, 3}, at::kDouble);
  const at::Tensor gamma = at::tensor({-2.0, 3.0}, at::kDouble);
  const at::Tensor z = Diffuse(x, gamma, eps);
  const at::Tensor a = at::sqrt(at::sigmoid(-gamma)).reshape({2, 1, 1, 1});
  const at::Tensor s = at::sqrt(at::sigmoid(gamma)).reshape({2, 1, 1, 1});
  const at::Tensor v = a * eps - s * x;
  EXPECT_TRUE(at::allclose(ToEps("v", v, z, gamma), eps, 1e-9, 1e-12));
  EXPECT_TRUE(at::allclose(ToEps("x", x, z, gamma), eps, 1e-9, 1e-9));
  EXPECT_TRUE(at::allclose(PredictX(z, gamma, eps), x, 1e-9, 1e-12));
}

TEST(DiffusionTest, DecodeMostLikelyInvertsTheDataMap) {
  const at::Tensor x = at::arange(256, at::kLong).reshape({1, 1, 16, 16});
  const at::Tensor gamma0 = at::tensor({-13.3}, at::kDouble);
  const at::Tensor z0 = at::sqrt(at::sigmoid(-gamma0)) * ToModelSpace(x).to(at::kDouble);
  EXPECT_TRUE(at::equal(DecodeMostLikely(z0, gamma0), x.to(at::kByte)));
}

TEST(DiffusionTest, StratifiedTimesCoverTheUnitInterval) {
  const at::Tensor t = StratifiedTimes(4, 0.5);
  EXPECT_TRUE(at::allclose(t, at::tensor({0.125, 0.375, 0.625, 0.875},
                                         at::kDouble)));
}

TEST(DiffusionTest, DiscreteLossApproachesContinuousFromAbove) {
  // For the same eps residual, the discrete weight T expm1(gamma_t - gamma_s)
  // with a linear schedule is >= gamma' and tends to it as T grows.
  const at::Tensor eps = at::ones({1, 1, 1, 1}, at::kDouble);
  const at::Tensor eps_hat = at::zeros({1, 1, 1, 1}, at::kDouble);
  const double slope = 18.3;
  const double cont =
      DiffusionLossContinuous(eps, eps_hat, at::tensor({slope}, at::kDouble))
          .item<double>();
  double previous = 1e30;
  for (int64_t T : {10, 100, 1000}) {
    const double d =
        DiffusionLossDiscrete(eps, eps_hat, at::tensor({slope / T}, at::kDouble),
                              at::tensor({0.0}, at::kDouble), T)
            .item<double>();
    EXPECT_GT(d, cont);
    EXPECT_LT(d, previous);
    previous = d;
  }
  EXPECT_NEAR(previous, cont, cont * 0.01);
}

}  // namespace
}  // namespace vdm
