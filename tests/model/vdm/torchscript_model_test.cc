// Tests of the TorchScript model loader and its contract check, with small
// models exported at build time by tests/make_test_models.py.
#include "model/vdm/torchscript_model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

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
        BrokenCase{"broken_nan_output.pt", "non-finite"},
        BrokenCase{"broken_forward_raises.pt", "forward failed"}));

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
