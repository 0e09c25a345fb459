// The local-defect sets (tools/ood_sets.h): what changed is what the mask
// says, the donor is of another class, the patch is garment and lies on the
// garment; the kNN distance and the AUROCs on cases with known answers.
#include "tools/ood_sets.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

namespace vdm {
namespace {

// n "garments": image i is a filled rectangle of gray 50 + 20 i inside a
// black 28 x 28 frame (rows 4..23, columns 6..21); label = i % 2.
struct Garments {
  at::Tensor images, labels;
};
Garments Make(int64_t n) {
  Garments g{at::zeros({n, 1, 28, 28}, at::kByte), at::arange(n) % 2};
  for (int64_t i = 0; i < n; ++i) {
    g.images[i].narrow(1, 4, 20).narrow(2, 6, 16).fill_(50 + 20 * i);
  }
  return g;
}

TEST(OodSetsTest, JoinedHalvesChangeOnlyTheBottomHalfToAnotherClass) {
  const Garments g = Make(6);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const DefectSet set = JoinHalves(g.images, g.labels, g.images, g.labels, gen);
  for (int64_t i = 0; i < 6; ++i) {
    EXPECT_TRUE(set.images[i].narrow(1, 0, 14).equal(g.images[i].narrow(1, 0, 14)));
    const int bottom = set.images[i][0][20][10].item<uint8_t>();
    const int64_t donor = (bottom - 50) / 20;
    EXPECT_NE(donor % 2, i % 2) << "the donor is of another class";
    EXPECT_FALSE(set.masks[i].narrow(0, 0, 14).any().item<bool>());
    EXPECT_TRUE(set.masks[i].equal(set.images[i][0].ne(g.images[i][0])));
    EXPECT_TRUE(set.masks[i].any().item<bool>());
  }
}

TEST(OodSetsTest, APastedPatchIsAnotherGarmentsInkOnTheGarment) {
  const Garments g = Make(8);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(2);
  const DefectSet set = PastePatches(g.images, g.labels, g.images, g.labels, 9, gen);
  for (int64_t i = 0; i < 8; ++i) {
    const at::Tensor changed = set.masks[i];
    const int64_t count = changed.sum().item<int64_t>();
    EXPECT_EQ(count, 81) << "a 9 x 9 window of ink, every pixel another gray";
    const at::Tensor where = changed.nonzero();
    EXPECT_GE(where.select(1, 0).min().item<int64_t>(), 4) << "inside the garment";
    EXPECT_LE(where.select(1, 0).max().item<int64_t>(), 23);
    EXPECT_GE(where.select(1, 1).min().item<int64_t>(), 6);
    EXPECT_LE(where.select(1, 1).max().item<int64_t>(), 21);
    const at::Tensor pasted = set.images[i][0].masked_select(changed);
    EXPECT_TRUE(pasted.gt(0).all().item<bool>()) << "garment, not background";
    const int64_t donor = (pasted[0].item<uint8_t>() - 50) / 20;
    EXPECT_NE(donor % 2, i % 2);
    EXPECT_TRUE(set.images[i][0].masked_select(changed.logical_not())
                    .equal(g.images[i][0].masked_select(changed.logical_not())));
  }
  at::Generator again = at::make_generator<at::CPUGeneratorImpl>(2);
  EXPECT_TRUE(PastePatches(g.images, g.labels, g.images, g.labels, 9, again)
                  .images.equal(set.images))
      << "a seed makes the same set";
}

TEST(OodSetsTest, RotationIsAQuarterTurn) {
  at::Tensor x = at::zeros({1, 1, 28, 28}, at::kByte);
  x[0][0][0][27] = 200;  // top right
  EXPECT_EQ(RotateQuarter(x)[0][0][0][0].item<uint8_t>(), 200) << "to the top left";
}

TEST(OodSetsTest, KthNearestDistanceAndAurocs) {
  const at::Tensor reference = at::tensor({0.0, 1.0, 3.0, 7.0}).view({4, 1});
  const at::Tensor query = at::tensor({0.0, 10.0}).view({2, 1});
  const at::Tensor d1 = KthNearestDistance(query, reference, 1);
  const at::Tensor d2 = KthNearestDistance(query, reference, 2);
  EXPECT_DOUBLE_EQ(d1[0].item<double>(), 0.0);
  EXPECT_DOUBLE_EQ(d1[1].item<double>(), 3.0);
  EXPECT_DOUBLE_EQ(d2[0].item<double>(), 1.0);
  EXPECT_DOUBLE_EQ(d2[1].item<double>(), 7.0);
  EXPECT_DOUBLE_EQ(Auroc({3, 4}, {1, 2}), 1.0);
  EXPECT_DOUBLE_EQ(Auroc({1, 2}, {3, 4}), 0.0);
  EXPECT_DOUBLE_EQ(Auroc({1, 3}, {2, 2}), 0.5);
  EXPECT_DOUBLE_EQ(Auroc({2}, {2}), 0.5) << "ties count half";
  at::Tensor maps = at::zeros({1, 2, 2});
  maps[0][0][0] = 5;
  at::Tensor masks = at::zeros({1, 2, 2}, at::kBool);
  masks[0][0][0] = true;
  EXPECT_DOUBLE_EQ(PixelAuroc(maps, masks), 1.0);
}

}  // namespace
}  // namespace vdm
