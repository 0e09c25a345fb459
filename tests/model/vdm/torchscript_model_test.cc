// Tests of the TorchScript model loader and its contract check, with small
// models exported at build time by tests/make_test_models.py.
#include "model/vdm/torchscript_model.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

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

TorchScriptModel::Options WithPrecision(const std::string& file,
                                        const std::string& precision) {
  TorchScriptModel::Options o;
  o.path = ModelPath(file);
  o.precision = precision;
  return o;
}

TEST(TorchScriptModelTest, Fp32IsExactlyTheModulesForward) {
  // precision=fp32 (the default) is what Denoise always computed: the
  // module's forward on the inputs as they are, converted to eps.
  auto model = TorchScriptModel::Load(WithPrecision("tiny.pt", "fp32"));
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ((*model)->precision(), Precision::kFp32);
  torch::NoGradGuard no_grad;
  torch::manual_seed(3);
  const at::Tensor z = torch::randn({4, 1, 28, 28});
  const at::Tensor gamma = torch::tensor({-10.0f, -2.0f, 1.0f, 4.0f});
  const at::Tensor label = torch::tensor({0, 3, 9, 10}, torch::kLong);
  auto eps = (*model)->Denoise(z, gamma, label);
  ASSERT_TRUE(eps.ok()) << eps.status();
  const at::Tensor raw =
      (*model)->module().forward({z, gamma, label}).toTensor();
  EXPECT_TRUE(torch::equal(*eps, raw));
  auto fp32 = (*model)->DenoiseFp32(z, gamma, label);
  ASSERT_TRUE(fp32.ok()) << fp32.status();
  EXPECT_TRUE(torch::equal(*fp32, raw));
}

TEST(TorchScriptModelTest, Bf16IsCloseToFp32AndItsFp32PathIsExact) {
  auto f32 = TorchScriptModel::Load(WithPrecision("tiny.pt", "fp32"));
  auto b16 = TorchScriptModel::Load(WithPrecision("tiny.pt", "bf16"));
  ASSERT_TRUE(f32.ok()) << f32.status();
  ASSERT_TRUE(b16.ok()) << b16.status();
  EXPECT_EQ((*b16)->precision(), Precision::kBf16);
  torch::NoGradGuard no_grad;
  torch::manual_seed(4);
  const at::Tensor z = torch::randn({8, 1, 28, 28});
  const at::Tensor gamma = torch::linspace(-12.0, 4.0, 8);
  const at::Tensor label = torch::arange(8, torch::kLong);
  auto want = (*f32)->Denoise(z, gamma, label);
  auto got = (*b16)->Denoise(z, gamma, label);
  ASSERT_TRUE(want.ok() && got.ok());
  EXPECT_EQ(got->scalar_type(), at::kFloat);
  EXPECT_FALSE(at::autocast::is_cpu_enabled()) << "autocast left on";
  // bf16 keeps 8 bits of mantissa: close, but not the same numbers (so
  // autocast did run).
  const double rel = ((*got - *want).norm() / want->norm()).item<double>();
  EXPECT_LT(rel, 0.05);
  EXPECT_GT(rel, 0.0);
  auto exact = (*b16)->DenoiseFp32(z, gamma, label);
  ASSERT_TRUE(exact.ok()) << exact.status();
  EXPECT_TRUE(torch::equal(*exact, *want));
}

TEST(TorchScriptModelTest, DenoiseHandsTheModelItsDeviceAndDtypes) {
  // probe.pt (tests/make_test_models.py) raises unless z and gamma arrive
  // as f32 and label as i64 on its weights' device, and returns its
  // convolution's output in the dtype it has (bf16 under autocast). This
  // catches Denoise passing the rows on as they are (here f64 z and gamma,
  // i32 labels; on a GPU replica, CPU tensors) or returning the network's
  // dtype. The conversion is the same `.to(device, dtype)` call that moves
  // rows to a CUDA replica; with only a CPU here, the device part is
  // recorded (seen_device) but cannot differ.
  for (const char* precision : {"fp32", "bf16"}) {
    auto model = TorchScriptModel::Load(WithPrecision("probe.pt", precision));
    ASSERT_TRUE(model.ok()) << model.status();
    torch::NoGradGuard no_grad;
    const at::Tensor z = torch::randn({3, 1, 4, 4}, torch::kDouble);
    const at::Tensor gamma = torch::tensor({-1.0, 0.0, 2.0}, torch::kDouble);
    const at::Tensor label = torch::tensor({0, 1, 2}, torch::kInt);
    auto eps = (*model)->Denoise(z, gamma, label);
    ASSERT_TRUE(eps.ok()) << precision << ": " << eps.status();
    EXPECT_EQ(eps->scalar_type(), at::kFloat) << precision;
    EXPECT_EQ(eps->device(), z.device()) << precision;
    torch::jit::Module& m = (*model)->module();
    EXPECT_EQ(m.attr("seen_device").toStringRef(),
              (*model)->device().str());
    EXPECT_EQ(m.attr("seen_bf16").toBool(), std::string(precision) == "bf16");
    ASSERT_TRUE((*model)->DenoiseFp32(z, gamma, label).ok());
    EXPECT_FALSE(m.attr("seen_bf16").toBool()) << "the fp32 path is fp32";
  }
}

TEST(TorchScriptModelTest, PrecisionIsParsedAndAutoFollowsTheHardware) {
  EXPECT_EQ(*ResolvePrecision("fp32", "cpu"), Precision::kFp32);
  EXPECT_EQ(*ResolvePrecision("bf16", "cpu"), Precision::kBf16);
  EXPECT_EQ(*ResolvePrecision("auto", "cpu"),
            HasNativeBf16("cpu") ? Precision::kBf16 : Precision::kFp32);
  auto bad = ResolvePrecision("fp16", "cpu");
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("--precision"));
  auto refused = TorchScriptModel::Load(WithPrecision("tiny.pt", "int8"));
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("int8"));
}

// A timing of fixed seconds per forward pass in each precision.
std::function<absl::StatusOr<double>(Precision)> Timing(double fp32,
                                                        double bf16,
                                                        int* calls = nullptr) {
  return [=](Precision p) -> absl::StatusOr<double> {
    if (calls) ++*calls;
    return p == Precision::kBf16 ? bf16 : fp32;
  };
}

TEST(ChoosePrecisionTest, Bf16OnlyWhenItMeasuresClearlyFaster) {
  // A CPU with AMX: bf16 twice as fast.
  PrecisionTrial t = ChoosePrecision(true, 32, Timing(0.2, 0.1));
  EXPECT_EQ(t.chosen, Precision::kBf16);
  EXPECT_NEAR(t.fp32_rows_per_second, 160, 1e-9);
  EXPECT_NEAR(t.bf16_rows_per_second, 320, 1e-9);
  EXPECT_THAT(t.reason, HasSubstr("2.00x"));
  // avx512_bf16 without AMX: bf16 is slower (0.71x measured on such a CPU).
  t = ChoosePrecision(true, 32, Timing(0.1, 0.1 / 0.71));
  EXPECT_EQ(t.chosen, Precision::kFp32);
  EXPECT_THAT(t.reason, HasSubstr("0.71x"));
  // Faster, but by less than the margin.
  EXPECT_EQ(ChoosePrecision(true, 32, Timing(0.11, 0.1)).chosen,
            Precision::kFp32);
  EXPECT_EQ(ChoosePrecision(true, 32, Timing(0.116, 0.1)).chosen,
            Precision::kBf16);
}

TEST(ChoosePrecisionTest, NoNativeBf16IsNotTimedAndAFailedPassMeansFp32) {
  int calls = 0;
  const PrecisionTrial none = ChoosePrecision(false, 32, Timing(1, 0.1, &calls));
  EXPECT_EQ(none.chosen, Precision::kFp32);
  EXPECT_EQ(calls, 0);
  EXPECT_EQ(none.bf16_rows_per_second, 0);
  auto failing = [](Precision p) -> absl::StatusOr<double> {
    if (p == Precision::kBf16) return absl::InternalError("no bf16 kernel");
    return 0.1;
  };
  const PrecisionTrial failed = ChoosePrecision(true, 32, failing);
  EXPECT_EQ(failed.chosen, Precision::kFp32);
  EXPECT_THAT(failed.reason, HasSubstr("no bf16 kernel"));
}

TEST(ChoosePrecisionTest, AutoLoadMeasuresAndReportsItsChoice) {
  TorchScriptModel::Options o = WithPrecision("tiny.pt", "auto");
  o.timing_rows = 4;
  auto model = TorchScriptModel::Load(o);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto& trial = (*model)->precision_trial();
  ASSERT_TRUE(trial.has_value());
  EXPECT_EQ(trial->chosen, (*model)->precision());
  EXPECT_FALSE(trial->reason.empty());
  if (HasNativeBf16("cpu")) {
    EXPECT_GT(trial->fp32_rows_per_second, 0);
    EXPECT_GT(trial->bf16_rows_per_second, 0);
  } else {
    EXPECT_EQ((*model)->precision(), Precision::kFp32);
  }
  EXPECT_FALSE((*TorchScriptModel::Load(WithPrecision("tiny.pt", "fp32")))
                   ->precision_trial()
                   .has_value());
}

}  // namespace
}  // namespace vdm
