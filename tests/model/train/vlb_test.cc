// The VDM++ loss weightings of ComputeVlb (model/train/vlb.cc).
#include "model/train/vlb.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "gtest/gtest.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/torchscript_model.h"
#include "tests/model/train/test_data.h"

namespace vdm {
namespace {

TEST(VlbTest, WeightingNames) {
  EXPECT_EQ(*ParseWeighting("elbo"), Weighting::Kind::kElbo);
  EXPECT_EQ(*ParseWeighting("sigmoid"), Weighting::Kind::kSigmoid);
  EXPECT_FALSE(ParseWeighting("mse").ok());
  EXPECT_EQ(WeightingName(Weighting::Kind::kSigmoid), "sigmoid");
}

TEST(VlbTest, ElboLossIsTheVlbAndSigmoidWeighsEachTime) {
  SetTorchThreads(1);
  TorchScriptModel::Options load;
  load.path = test_data::TinyModel();
  auto model = TorchScriptModel::Load(load);
  ASSERT_TRUE(model.ok()) << model.status();
  ModelInfo info{(*model)->shape(), (*model)->num_classes(),
                 (*model)->prediction()};
  at::Tensor x = at::randint(0, 256, {4, 1, 28, 28}, at::kByte);
  at::Tensor labels = at::arange(4, at::kLong);
  at::Tensor t = at::tensor({0.05f, 0.3f, 0.6f, 0.95f});
  auto run = [&](const Weighting& w) {
    at::Generator gen = at::detail::createCPUGenerator(5);
    torch::NoGradGuard no_grad;
    auto terms = ComputeVlb((*model)->module(), info, x, labels, t, gen, w);
    EXPECT_TRUE(terms.ok()) << terms.status();
    return *terms;
  };
  const VlbTerms elbo = run({});
  EXPECT_TRUE(at::equal(elbo.Loss(), elbo.Total()));
  Weighting sigmoid{Weighting::Kind::kSigmoid, 2.0};
  const VlbTerms weighted = run(sigmoid);
  EXPECT_TRUE(at::equal(weighted.Total(), elbo.Total()));  // same VLB
  at::Tensor gamma = LinearGamma(t, -13.3, 5.0);
  at::Tensor want = elbo.diffusion * at::sigmoid(gamma + 2.0);
  EXPECT_TRUE(at::allclose(weighted.weighted_diffusion, want, 1e-5, 1e-4));
  EXPECT_TRUE(at::all(weighted.Loss() < elbo.Loss()).item<bool>());
  // w(lambda) = sigmoid(-lambda + b): 1/2 at lambda = b.
  at::Tensor half = LossWeight(sigmoid, at::tensor({-2.0f}));
  EXPECT_NEAR(half.item<float>(), 0.5f, 1e-6);
}

}  // namespace
}  // namespace vdm
