// Tests of the fused group norm + SiLU (model/vdm/fused_norm_silu.h): the
// operator against libtorch's two, the graph rewrite on an exported test
// network, and the loader's option.
#include "model/vdm/fused_norm_silu.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/CPUGeneratorImpl.h>

#include <string>
#include <vector>

#include "model/vdm/torchscript_model.h"

namespace vdm {
namespace {

std::string ModelPath(const std::string& name) {
  return std::string(VDM_TEST_MODELS_DIR) + "/" + name;
}

at::Tensor Randn(at::IntArrayRef sizes, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn(sizes, gen, at::kFloat);
}

// The fused kernel rounds differently from libtorch's (its own exp, its own
// summation order), by a few float ulps of values of order one: 2e-5 is ~100
// ulps at 1, far below any real error (a wrong channel's scale, a missed
// element, a wrong variance would be off by O(0.1)).
constexpr double kTol = 2e-5;

double MaxAbsDiff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

struct Case {
  std::vector<int64_t> sizes;
  int64_t groups;
};

TEST(GroupNormSiluTest, MatchesGroupNormThenSilu) {
  // The network's shapes, odd sizes that leave a tail of 1-7 elements per
  // channel (the vector loop is 8 wide), one element per channel, a 3-D
  // input and one group per channel.
  const std::vector<Case> cases = {
      {{4, 48, 28, 28}, 8}, {{3, 96, 7, 7}, 8}, {{2, 6, 5, 3}, 3},
      {{2, 4, 1, 1}, 2},    {{5, 8, 13}, 4},    {{1, 12, 9, 9}, 12},
      {{2, 16, 17, 1}, 1}};
  uint64_t seed = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::PrintToString(c.sizes));
    // Off-centre and scaled, so the statistics matter.
    const at::Tensor x = Randn(c.sizes, ++seed) * 3.0 + 1.5;
    const at::Tensor w = Randn({c.sizes[1]}, ++seed);
    const at::Tensor b = Randn({c.sizes[1]}, ++seed);
    const at::Tensor want = GroupNormSiluReference(x, c.groups, w, b, 1e-6);
    const at::Tensor got = GroupNormSilu(x, c.groups, w, b, 1e-6);
    ASSERT_EQ(got.sizes(), x.sizes());
    ASSERT_EQ(got.scalar_type(), at::kFloat);
    EXPECT_LT(MaxAbsDiff(got, want), kTol);
    // Without weight and bias (scale 1, shift 0).
    EXPECT_LT(MaxAbsDiff(GroupNormSilu(x, c.groups, {}, {}, 1e-5),
                         GroupNormSiluReference(x, c.groups, {}, {}, 1e-5)),
              kTol);
  }
}

TEST(GroupNormSiluTest, NonContiguousInputIsRead) {
  const at::Tensor x = Randn({2, 8, 6, 10}, 1).transpose(2, 3);  // 2x8x10x6
  ASSERT_FALSE(x.is_contiguous());
  const at::Tensor w = Randn({8}, 2), b = Randn({8}, 3);
  EXPECT_LT(MaxAbsDiff(GroupNormSilu(x, 4, w, b, 1e-6),
                       GroupNormSiluReference(x, 4, w, b, 1e-6)),
            kTol);
}

TEST(GroupNormSiluTest, LargeActivationsSaturateWithoutOverflow) {
  // exp(-v) is clamped for |v| > 87: silu(v) must still be v for large v
  // and 0 for very negative v, never inf or NaN.
  at::Tensor x = Randn({1, 2, 4, 4}, 4);
  const at::Tensor w = at::full({2}, 1e4f), b = at::zeros({2});
  const at::Tensor got = GroupNormSilu(x, 1, w, b, 1e-6);
  ASSERT_TRUE(got.isfinite().all().item<bool>());
  const at::Tensor normed = at::group_norm(x, 1, w, b, 1e-6);
  const at::Tensor pos = normed > 100, neg = normed < -100;
  ASSERT_GT(pos.sum().item<int64_t>(), 0);
  ASSERT_GT(neg.sum().item<int64_t>(), 0);
  EXPECT_TRUE(at::allclose(got.masked_select(pos), normed.masked_select(pos),
                           1e-6, 0));
  EXPECT_LT(got.masked_select(neg).abs().max().item<float>(), 1e-30f);
}

TEST(GroupNormSiluTest, Bf16InputIsComputedInFp32LikeAutocast) {
  // Under autocast the convolution before it yields bf16 and group norm
  // runs in fp32: the fused operator reads bf16 and returns fp32.
  const at::Tensor x = Randn({2, 8, 7, 7}, 5).to(at::kBFloat16);
  const at::Tensor w = Randn({8}, 6), b = Randn({8}, 7);
  const at::Tensor got = GroupNormSilu(x, 4, w, b, 1e-6);
  EXPECT_EQ(got.scalar_type(), at::kFloat);
  EXPECT_LT(MaxAbsDiff(got, GroupNormSiluReference(x.to(at::kFloat), 4, w, b,
                                                   1e-6)),
            kTol);
}

TEST(GroupNormSiluTest, OtherDtypesTakeLibtorchsOperators) {
  const at::Tensor x = Randn({2, 4, 3, 3}, 8).to(at::kDouble);
  const at::Tensor got = GroupNormSilu(x, 2, {}, {}, 1e-6);
  EXPECT_EQ(got.scalar_type(), at::kDouble);
  EXPECT_TRUE(at::equal(got, GroupNormSiluReference(x, 2, {}, {}, 1e-6)));
}

TEST(GroupNormSiluTest, GradientsFlowThroughTheUnfusedOperators) {
  // The ODE likelihood takes vector-Jacobian products through the network.
  const at::Tensor x0 = Randn({2, 8, 5, 5}, 9);
  const at::Tensor w0 = Randn({8}, 10), b0 = Randn({8}, 11);
  auto grads = [&](bool fused) {
    at::Tensor x = x0.clone().requires_grad_(true);
    at::Tensor w = w0.clone().requires_grad_(true);
    at::Tensor b = b0.clone().requires_grad_(true);
    at::Tensor y = fused ? GroupNormSilu(x, 4, w, b, 1e-6)
                         : GroupNormSiluReference(x, 4, w, b, 1e-6);
    (y * y).sum().backward();
    return std::vector<at::Tensor>{x.grad(), w.grad(), b.grad()};
  };
  const auto got = grads(true), want = grads(false);
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(got[i].defined()) << i;
    EXPECT_TRUE(at::allclose(got[i], want[i], 1e-5, 1e-6)) << i;
  }
}

TEST(GroupNormSiluTest, BadShapesFailAsGroupNormFails) {
  const at::Tensor x = Randn({2, 6, 4, 4}, 12);
  EXPECT_THROW(GroupNormSilu(x, 4, {}, {}, 1e-6), c10::Error);  // 6 % 4
  EXPECT_THROW(GroupNormSilu(x, 2, at::ones({5}), {}, 1e-6), c10::Error);
}

int CountKind(const torch::jit::Block* block, const char* kind) {
  const c10::Symbol symbol = c10::Symbol::fromQualString(kind);
  int n = 0;
  for (const torch::jit::Node* node : block->nodes()) {
    if (node->kind() == symbol) ++n;
    for (const torch::jit::Block* sub : node->blocks()) n += CountKind(sub, kind);
  }
  return n;
}

TEST(FuseGroupNormSiluTest, RewritesThePairsAndKeepsTheForward) {
  torch::jit::Module plain = torch::jit::load(ModelPath("tiny.pt"));
  torch::jit::Module fused = torch::jit::load(ModelPath("tiny.pt"));
  const int pairs = FuseGroupNormSilu(fused);
  const auto graph = fused.get_method("forward").graph();
  // tiny.pt's 21 pairs; the group norm before its attention has no SiLU
  // after it and stays.
  EXPECT_GT(pairs, 10);
  EXPECT_EQ(CountKind(graph->block(), "vdm::group_norm_silu"), pairs);
  EXPECT_EQ(CountKind(graph->block(), "aten::group_norm"), 1);
  torch::NoGradGuard no_grad;
  const at::Tensor z = Randn({4, 1, 28, 28}, 13);
  const at::Tensor gamma = at::linspace(-12.0, 4.0, 4, at::kFloat);
  const at::Tensor label = at::tensor({0, 3, 9, 10}, at::kLong);
  const at::Tensor want = plain.forward({z, gamma, label}).toTensor();
  const at::Tensor got = fused.forward({z, gamma, label}).toTensor();
  EXPECT_LT(MaxAbsDiff(got, want), 1e-4 * (1 + want.abs().max().item<double>()));
  // A second pass over an already fused module finds nothing.
  EXPECT_EQ(FuseGroupNormSilu(fused), 0);
}

TEST(FuseGroupNormSiluTest, LoaderFusesOnlyWhenAsked) {
  TorchScriptModel::Options options;
  options.path = ModelPath("tiny.pt");
  auto plain = TorchScriptModel::Load(options);
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_EQ((*plain)->fused_norm_silu(), 0);
  options.fuse_norm_silu = true;
  auto fused = TorchScriptModel::Load(options);
  ASSERT_TRUE(fused.ok()) << fused.status();
  EXPECT_GT((*fused)->fused_norm_silu(), 10);

  const at::Tensor z = Randn({3, 1, 28, 28}, 14);
  const at::Tensor gamma = at::tensor({-10.0f, 0.0f, 4.0f});
  const at::Tensor label = at::tensor({1, 5, 10}, at::kLong);
  auto want = (*plain)->Denoise(z, gamma, label);
  auto got = (*fused)->Denoise(z, gamma, label);
  ASSERT_TRUE(want.ok() && got.ok());
  EXPECT_LT(MaxAbsDiff(*got, *want), 1e-4 * (1 + want->abs().max().item<double>()));
  // Vector-Jacobian products (the ODE likelihood) through the fused module.
  const at::Tensor v = Randn({3, 1, 28, 28}, 15);
  auto vjp_want = (*plain)->DenoiseVjp(z, gamma, label, v);
  auto vjp_got = (*fused)->DenoiseVjp(z, gamma, label, v);
  ASSERT_TRUE(vjp_want.ok()) << vjp_want.status();
  ASSERT_TRUE(vjp_got.ok()) << vjp_got.status();
  EXPECT_LT(MaxAbsDiff(vjp_got->vjp, vjp_want->vjp),
            1e-4 * (1 + vjp_want->vjp.abs().max().item<double>()));
}

}  // namespace
}  // namespace vdm
