// One-step reconstructions (model/vdm/reconstruction.h): the rows are the
// images diffused with shared noise at the probe times, x_hat follows the
// parameterization exactly, the result does not depend on the chunking,
// and bad input gets errors naming it.
#include "model/vdm/reconstruction.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "model/vdm/diffusion.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

// gamma(t) = -6 + 12 t.
ScheduleFn Linear() {
  return [](const at::Tensor& t) -> absl::StatusOr<GammaValues> {
    return GammaValues{-6.0 + 12.0 * t, at::full_like(t, 12.0)};
  };
}

at::Tensor Images(int64_t n) {
  return (at::arange(n * 16, at::kLong).view({n, 1, 4, 4}) * 13 + 7)
      .remainder(256)
      .to(at::kByte);
}

ReconstructionOptions Probes() {
  ReconstructionOptions o;
  o.times = {0.3, 0.8};
  o.draws = 2;
  o.seed = 4;
  return o;
}

TEST(ReconstructionTest, ThePerfectDenoiserReconstructsExactly) {
  const at::Tensor x = Images(3);
  auto plan = ReconstructionPlan::Create(x, at::Tensor(), Probes(), Linear());
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ((*plan)->rows(), 3 * 4);
  const Rows rows = *(*plan)->RowsAt(0, (*plan)->rows());
  // The true noise of each row: eps = (z - alpha f) / sigma.
  const at::Tensor f = ToModelSpace(x).repeat_interleave(4, 0);
  const at::Tensor g = rows.gamma.view({-1, 1, 1, 1});
  const at::Tensor eps = (rows.z - at::sqrt(AlphaSquared(g)) * f) /
                         at::sqrt(SigmaSquared(g));
  ASSERT_TRUE((*plan)->Consume(0, eps).ok());
  ASSERT_TRUE((*plan)->complete());
  EXPECT_LT((*plan)->errors().max().item<double>(), 1e-9);
  EXPECT_LT((*plan)->error_map().max().item<double>(), 1e-8);
  EXPECT_TRUE(at::equal((*plan)->reconstructions()[1][3], x[1]));
  // The noise is shared: image 0 and 2 see the same eps at each probe.
  EXPECT_TRUE(at::allclose(eps[0], eps[8], 1e-5, 1e-5));
}

TEST(ReconstructionTest, ZeroPredictionsGiveTheNoisyImageBack) {
  // eps_hat = 0: x_hat = z / alpha = f + (sigma / alpha) eps, so the error
  // at time t is (sigma^2 / alpha^2) mean(eps^2), the draws averaged.
  const at::Tensor x = Images(2);
  auto plan = ReconstructionPlan::Create(x, at::Tensor(), Probes(), Linear());
  ASSERT_TRUE(plan.ok());
  const Rows rows = *(*plan)->RowsAt(0, (*plan)->rows());
  ASSERT_TRUE((*plan)->Consume(0, at::zeros_like(rows.z)).ok());
  const at::Tensor f = ToModelSpace(x).repeat_interleave(4, 0).to(at::kDouble);
  const at::Tensor unclamped =
      (rows.z.to(at::kDouble) /
       at::sqrt(AlphaSquared(rows.gamma.to(at::kDouble))).view({-1, 1, 1, 1}))
          .clamp(-1, 1);
  const at::Tensor expected =
      (unclamped - f).pow(2).flatten(1).mean(1).view({2, 2, 2}).mean(2);
  EXPECT_TRUE(at::allclose((*plan)->errors(), expected, 1e-6, 1e-9));
  // More noise, more error.
  EXPECT_TRUE(((*plan)->errors().select(1, 1) > (*plan)->errors().select(1, 0))
                  .all()
                  .item<bool>());
}

TEST(ReconstructionTest, ChunksInAnyOrderGiveTheSameResult) {
  const at::Tensor x = Images(3);
  auto whole = ReconstructionPlan::Create(x, at::Tensor(), Probes(), Linear());
  auto parts = ReconstructionPlan::Create(x, at::Tensor(), Probes(), Linear());
  ASSERT_TRUE(whole.ok() && parts.ok());
  const Rows all = *(*whole)->RowsAt(0, 12);
  const at::Tensor eps_hat = 0.3 * all.z;  // any function of the rows
  ASSERT_TRUE((*whole)->Consume(0, eps_hat).ok());
  for (auto [begin, count] : {std::pair{7, 5}, std::pair{0, 3}, std::pair{3, 4}}) {
    const Rows r = *(*parts)->RowsAt(begin, count);
    EXPECT_TRUE(at::equal(r.z, all.z.narrow(0, begin, count)));
    ASSERT_TRUE((*parts)->Consume(begin, 0.3 * r.z).ok());
  }
  ASSERT_TRUE((*parts)->complete());
  EXPECT_TRUE(at::equal((*whole)->errors(), (*parts)->errors()));
  EXPECT_TRUE(at::equal((*whole)->reconstructions(), (*parts)->reconstructions()));
}

TEST(ReconstructionTest, LabelsTravelWithTheRows) {
  const at::Tensor labels = at::tensor({3, 7}, at::kLong);
  auto plan = ReconstructionPlan::Create(Images(2), labels, Probes(), Linear());
  ASSERT_TRUE(plan.ok());
  const Rows rows = *(*plan)->RowsAt(2, 4);
  EXPECT_TRUE(at::equal(rows.label, at::tensor({3, 3, 7, 7}, at::kLong)));
}

TEST(ReconstructionTest, BadInputIsRefusedByName) {
  ReconstructionOptions o = Probes();
  o.times = {0.5, 1.0};
  EXPECT_THAT(std::string(ReconstructionPlan::Create(Images(1), at::Tensor(), o,
                                                     Linear())
                              .status()
                              .message()),
              HasSubstr("times must be in (0, 1)"));
  o = Probes();
  o.draws = 0;
  EXPECT_THAT(std::string(CheckReconstructionOptions(o).message()),
              HasSubstr("draws"));
  EXPECT_THAT(std::string(ReconstructionPlan::Create(
                              at::zeros({2, 1, 4, 4}), at::Tensor(), Probes(),
                              Linear())
                              .status()
                              .message()),
              HasSubstr("integer"));
  auto plan = ReconstructionPlan::Create(Images(1), at::Tensor(), Probes(), Linear());
  ASSERT_TRUE(plan.ok());
  EXPECT_FALSE((*plan)->RowsAt(3, 2).ok());
  const at::Tensor eps = at::zeros({2, 1, 4, 4});
  ASSERT_TRUE((*plan)->Consume(0, eps).ok());
  EXPECT_THAT(std::string((*plan)->Consume(1, eps).message()),
              HasSubstr("given twice"));
  EXPECT_FALSE((*plan)->Consume(0, at::zeros({1, 1, 3, 4})).ok());
}

}  // namespace
}  // namespace vdm
