// The thorough level's local match (model/vdm/local_match.h), with the test
// feature network (tests/make_test_models.py: tiny_features.pt, local
// features [B, 4, 14, 14]): an image of the reference matches itself
// everywhere, a pasted square is found where it was pasted, a cell may match
// a neighbour one cell away and no farther, and bad input gets errors
// naming it.
#include "model/vdm/local_match.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "model/vdm/feature_model.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<FeatureModel> Net() {
  auto net = FeatureModel::Load(std::string(VDM_TEST_MODELS_DIR) + "/tiny_features.pt");
  EXPECT_TRUE(net.ok()) << net.status();
  return net.ok() ? *std::move(net) : nullptr;
}

// n garment-like images: a bright box of varying size on black.
at::Tensor Boxes(int64_t n) {
  at::Tensor x = at::zeros({n, 1, 28, 28}, at::kByte);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t m = 4 + i % 5;
    x[i].narrow(1, m, 28 - 2 * m).narrow(2, m + 1, 26 - 2 * m).fill_(120 + 10 * (i % 7));
  }
  return x;
}

std::vector<std::vector<float>> Embeddings(const FeatureModel& net, const at::Tensor& x) {
  const at::Tensor e = net.Features(x).value().contiguous();
  std::vector<std::vector<float>> out;
  for (int64_t i = 0; i < e.size(0); ++i) {
    out.emplace_back(e[i].data_ptr<float>(), e[i].data_ptr<float>() + e.size(1));
  }
  return out;
}

TEST(LocalMatchTest, TheFeatureNetworkGivesAGridOfLocalFeatures) {
  auto net = Net();
  ASSERT_NE(net, nullptr);
  EXPECT_TRUE(net->has_local_features());
  auto local = net->LocalFeatures(Boxes(3));
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_EQ(local->sizes(), (std::vector<int64_t>{3, 4, 14, 14}));
  EXPECT_FALSE(net->LocalFeatures(at::zeros({1, 1, 8, 8}, at::kByte)).ok());
}

TEST(LocalMatchTest, AReferenceImageMatchesItselfAndAPastedSquareIsFound) {
  auto net = Net();
  ASSERT_NE(net, nullptr);
  auto reference = MakeFeatureReference(*net, Boxes(30));
  ASSERT_TRUE(reference.ok()) << reference.status();
  EXPECT_EQ(reference->size(), 30);
  EXPECT_EQ(reference->dimension(), 8);
  ThoroughSetup setup;
  setup.local_neighbours = 5;
  // Reference image 3 itself: its own nearest neighbour, distance 0 in
  // every cell.
  const at::Tensor own = Boxes(30).narrow(0, 3, 1).contiguous();
  auto maps = LocalMatchMaps(*reference, setup, own, Embeddings(*net, own), *net);
  ASSERT_TRUE(maps.ok()) << maps.status();
  EXPECT_EQ(maps->sizes(), (std::vector<int64_t>{1, 14, 14}));
  EXPECT_LT(maps->abs().max().item<double>(), 1e-5);
  // A bright 6 x 6 square of another texture pasted at rows/cols 16..21:
  // the map's largest cells lie there, and the upsampled map in the
  // records is largest inside it.
  at::Tensor pasted = own.clone();
  pasted.narrow(2, 16, 6).narrow(3, 16, 6).copy_(
      (at::arange(36, at::kLong).view({1, 1, 6, 6}) * 97).remainder(256).to(at::kByte));
  std::vector<ImageBpd> records(1);
  records[0].thorough = ThoroughFeatures{};
  records[0].thorough->embedding = Embeddings(*net, pasted)[0];
  ASSERT_TRUE(AddLocalMatch(*reference, setup, pasted, *net, &records).ok());
  const ThoroughFeatures& t = *records[0].thorough;
  ASSERT_EQ(t.local_height, 14);
  ASSERT_EQ(t.local_map.size(), 14u * 14u);
  ASSERT_EQ(t.map.size(), 28u * 28u);
  const at::Tensor map = at::tensor(t.map).view({28, 28});
  const double inside = map.narrow(0, 16, 6).narrow(1, 16, 6).mean().item<double>();
  const double outside = map.narrow(0, 0, 10).narrow(1, 0, 10).mean().item<double>();
  EXPECT_GT(inside, 10 * std::max(outside, 1e-6));
  const int64_t argmax = at::tensor(t.local_map).argmax().item<int64_t>();
  EXPECT_GE(argmax / 14, 7);
  EXPECT_GE(argmax % 14, 7);
}

TEST(LocalMatchTest, ACellMatchesWithinTheWindowOnly) {
  auto net = Net();
  ASSERT_NE(net, nullptr);
  // The reference: one image. The query: the same image moved by two
  // pixels (one cell of the 14 x 14 grid) to the right.
  const at::Tensor ref = Boxes(1);
  const at::Tensor moved = at::roll(ref, {2}, {3}).contiguous();
  auto reference = MakeFeatureReference(*net, ref);
  ASSERT_TRUE(reference.ok());
  ThoroughSetup setup;
  setup.local_neighbours = 1;
  setup.local_window = 0;
  auto strict = LocalMatchMaps(*reference, setup, moved, Embeddings(*net, moved), *net);
  setup.local_window = 1;
  auto loose = LocalMatchMaps(*reference, setup, moved, Embeddings(*net, moved), *net);
  ASSERT_TRUE(strict.ok() && loose.ok());
  // Away from the grid's edges a one-cell move is matched exactly.
  EXPECT_LT(loose->narrow(1, 1, 12).narrow(2, 2, 11).abs().max().item<double>(), 1e-5);
  EXPECT_GT(strict->sum().item<double>(), 1.0);
}

TEST(LocalMatchTest, BadInputIsNamed) {
  auto net = Net();
  ASSERT_NE(net, nullptr);
  auto reference = MakeFeatureReference(*net, Boxes(4));
  ASSERT_TRUE(reference.ok());
  ThoroughSetup setup;
  const at::Tensor x = Boxes(2);
  auto count = LocalMatchMaps(*reference, setup, x, Embeddings(*net, x.narrow(0, 0, 1)), *net);
  EXPECT_THAT(std::string(count.status().message()), HasSubstr("an embedding per image"));
  auto dim = LocalMatchMaps(*reference, setup, x, {{1.f, 2.f}, {3.f, 4.f}}, *net);
  EXPECT_THAT(std::string(dim.status().message()), HasSubstr("dimension"));
  std::vector<ImageBpd> records(2);
  EXPECT_THAT(std::string(AddLocalMatch(*reference, setup, x, *net, &records).message()),
              HasSubstr("without its thorough features"));
}

}  // namespace
}  // namespace vdm
