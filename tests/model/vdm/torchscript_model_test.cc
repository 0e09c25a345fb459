// Tests of the TorchScript model loader and its contract check, with small
// models exported at build time by tests/make_test_models.py.
#include "model/vdm/torchscript_model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include "model/vdm/diffusion.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

std::string ModelPath(const std::string& name) {
  return std::string(VDM_TEST_MODELS_DIR) + "/" + name;
}

TEST(TorchScriptModelTest, LoadsTheTinyModelAndReadsTheContract) {
  auto model = TorchScriptModel::Load({ModelPath("tiny.pt")});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->shape().channels, 1);
  EXPECT_EQ((*model)->shape().height, 28);
  EXPECT_EQ((*model)->shape().width, 28);
  EXPECT_EQ((*model)->num_classes(), 10);
  EXPECT_EQ((*model)->prediction(), "eps");
  EXPECT_THAT((*model)->metadata(), HasSubstr("config"));
}

TEST(TorchScriptModelTest, GammaHasTheLinearScheduleAndItsSlope) {
  auto model = TorchScriptModel::Load({ModelPath("tiny.pt")});
  ASSERT_TRUE(model.ok()) << model.status();
  auto g = (*model)->Gamma(torch::tensor({0.0f, 0.5f, 1.0f}));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_NEAR(g->gamma[0].item<float>(), -13.3f, 1e-5);
  EXPECT_NEAR(g->gamma[2].item<float>(), 5.0f, 1e-5);
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(g->dgamma_dt[i].item<float>(), 18.3f, 1e-4);
  }
}

TEST(TorchScriptModelTest, DenoiseReturnsEpsOfTheInputShape) {
  auto model = TorchScriptModel::Load({ModelPath("tiny.pt")});
  ASSERT_TRUE(model.ok()) << model.status();
  torch::NoGradGuard no_grad;
  const at::Tensor z = torch::randn({3, 1, 28, 28});
  auto eps = (*model)->Denoise(z, torch::full({3}, 1.0f),
                               torch::tensor({0, 5, 10}, torch::kLong));
  ASSERT_TRUE(eps.ok()) << eps.status();
  EXPECT_EQ(eps->sizes(), z.sizes());
  EXPECT_TRUE(torch::isfinite(*eps).all().item<bool>());
}

TEST(TorchScriptModelTest, VPredictionIsConvertedToEps) {
  // tiny_uncond_v predicts v; Denoise must return sigma z + alpha v.
  auto model = TorchScriptModel::Load({ModelPath("tiny_uncond_v.pt")});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->prediction(), "v");
  EXPECT_EQ((*model)->num_classes(), 0);
  torch::NoGradGuard no_grad;
  const at::Tensor z = torch::randn({2, 1, 28, 28});
  const at::Tensor gamma = torch::tensor({-2.0f, 3.0f});
  const at::Tensor label = torch::zeros({2}, torch::kLong);
  auto eps = (*model)->Denoise(z, gamma, label);
  ASSERT_TRUE(eps.ok()) << eps.status();
  const at::Tensor v =
      (*model)->module().forward({z, gamma, label}).toTensor();
  EXPECT_TRUE(torch::allclose(*eps, ToEps("v", v, z, gamma), 1e-5, 1e-6));
  EXPECT_FALSE(torch::allclose(*eps, v));
}

struct BrokenCase {
  const char* file;
  const char* message;  // what the error must name
};

class BrokenModelTest : public ::testing::TestWithParam<BrokenCase> {};

TEST_P(BrokenModelTest, IsRefusedWithAMessageNamingTheProblem) {
  auto model = TorchScriptModel::Load({ModelPath(GetParam().file)});
  ASSERT_FALSE(model.ok()) << GetParam().file << " was accepted";
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr(GetParam().message));
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr(GetParam().file));
}

INSTANTIATE_TEST_SUITE_P(
    Contract, BrokenModelTest,
    ::testing::Values(
        BrokenCase{"broken_no_gamma.pt", "missing method gamma"},
        BrokenCase{"broken_bad_prediction.pt", "prediction must be"},
        BrokenCase{"broken_wrong_shape.pt", "must return z's shape"},
        BrokenCase{"broken_no_metadata.pt", "attribute 'metadata'"},
        BrokenCase{"broken_no_num_classes.pt", "attribute 'num_classes'"},
        BrokenCase{"broken_decreasing_gamma.pt", "gamma(t) must increase"},
        // Right endpoints, but decreasing around t = 0.5: the 64-point grid.
        BrokenCase{"broken_bumpy_gamma.pt", "gamma"},
        BrokenCase{"broken_bumpy_gamma.pt", "on [0, 1]"},
        BrokenCase{"broken_gamma_no_grad.pt", "gamma(t) does not depend on t"},
        BrokenCase{"broken_nan_output.pt", "non-finite"},
        BrokenCase{"broken_forward_raises.pt", "forward failed"}));

TEST(TorchScriptModelTest, BumpyGammaIsRefusedAtItsFirstDecreasingPoint) {
  auto model = TorchScriptModel::Load({ModelPath("broken_bumpy_gamma.pt")});
  ASSERT_FALSE(model.ok());
  // gamma(t) = linear + 4 sin(2 pi t): d gamma/dt = 18.3 + 8 pi cos(2 pi t)
  // is first negative at t = 0.3808 (grid point 24 of 64, t = 0.381).
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr("d gamma/dt by autograd must be positive"));
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("t = 0.3810"));
}

TEST(TorchScriptModelTest, LearnedScheduleLoadsWithExactEndpoints) {
  auto model = TorchScriptModel::Load({ModelPath("tiny_learned.pt")});
  ASSERT_TRUE(model.ok()) << model.status();
  auto g = (*model)->Gamma(torch::tensor({0.0f, 0.5f, 1.0f}));
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_FLOAT_EQ(g->gamma[0].item<float>(), -13.3f);
  EXPECT_FLOAT_EQ(g->gamma[2].item<float>(), 5.0f);
  EXPECT_GT(g->dgamma_dt.min().item<float>(), 0.0f);
}

// The monotone network is monotone by construction: for any raw parameters
// (here large random ones) gamma passes the grid check, with the endpoints
// unchanged.
TEST(TorchScriptModelTest, LearnedScheduleIsMonotoneForRandomParameters) {
  torch::jit::Module module = torch::jit::load(ModelPath("tiny_learned.pt"));
  at::Generator gen = at::detail::createCPUGenerator(7);
  int shape_params = 0;
  for (int trial = 0; trial < 20; ++trial) {
    {
      torch::NoGradGuard no_grad;
      for (const auto& p : module.named_parameters()) {
        if (p.name.rfind("gamma_net.", 0) != 0) continue;
        if (trial == 0) ++shape_params;
        p.value.copy_(at::randn(p.value.sizes(), gen) * 4.0);
      }
    }
    EXPECT_TRUE(CheckGammaMonotone(module, torch::kCPU, 256).ok())
        << "trial " << trial;
    auto g = GammaWithDerivative(module, torch::tensor({0.0f, 1.0f}),
                                 torch::kCPU, false);
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_FLOAT_EQ(g->gamma[0].item<float>(), -13.3f);
    EXPECT_FLOAT_EQ(g->gamma[1].item<float>(), 5.0f);
  }
  EXPECT_EQ(shape_params, 5);  // l1 weight and bias, l2 weight and bias, l3
  TorchScriptModel::Options options;
  options.path = "randomized";
  EXPECT_TRUE(TorchScriptModel::FromModule(module, options).ok());
}

TEST(TorchScriptModelTest, MissingFileIsRefused) {
  auto model = TorchScriptModel::Load({ModelPath("does_not_exist.pt")});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr("does_not_exist.pt"));
}

TEST(TorchScriptModelTest, UnknownDeviceIsRefused) {
  auto model = TorchScriptModel::Load({ModelPath("tiny.pt"), "tpu:7"});
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("tpu:7"));
}

}  // namespace
}  // namespace vdm
