// Loading IDX files and folders of PNGs (model/train/dataset.cc).
#include "model/train/dataset.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/model/train/test_data.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const ImageShape kShape{1, 28, 28};

class DatasetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("vdm_dataset_test_" +
            std::string(::testing::UnitTest::GetInstance()
                            ->current_test_info()
                            ->name()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string dir() const { return dir_.string(); }
  fs::path dir_;
};

TEST_F(DatasetTest, LabeledPngFolderKeepsImagesAndLabels) {
  test_data::WritePngFolder(dir(), 30, /*labeled=*/true);
  auto data = LoadDataset(dir(), "train", kShape, 10);
  ASSERT_TRUE(data.ok()) << data.status();
  ASSERT_EQ(data->size(), 30);
  EXPECT_EQ(data->labels.bincount().eq(3).all().item<bool>(), true);
  // Shuffled, yet each image still carries its own label: the bar of
  // SyntheticImage(i) sits at row 2 + 2 (i % 10) = 2 + 2 label.
  for (int64_t i = 0; i < data->size(); ++i) {
    const int64_t label = data->labels[i].item<int64_t>();
    EXPECT_GT(data->images[i][0][2 + 2 * label][14].item<uint8_t>(), 200);
  }
  EXPECT_FALSE(at::equal(data->labels.slice(0, 0, 10),
                         at::arange(10, at::kLong)));  // shuffled
  // No test/ folder: no test set.
  auto test = LoadDataset(dir(), "t10k", kShape, 10);
  ASSERT_TRUE(test.ok()) << test.status();
  EXPECT_EQ(test->size(), 0);
}

TEST_F(DatasetTest, TrainAndTestSubfolders) {
  test_data::WritePngFolder(dir() + "/train", 20, /*labeled=*/true);
  test_data::WritePngFolder(dir() + "/test", 10, /*labeled=*/true);
  auto train = LoadDataset(dir(), "train", kShape, 10);
  auto test = LoadDataset(dir(), "t10k", kShape, 10, /*limit=*/4);
  ASSERT_TRUE(train.ok() && test.ok());
  EXPECT_EQ(train->size(), 20);
  EXPECT_EQ(test->size(), 4);
}

TEST_F(DatasetTest, UnlabeledPngsGetTheNoLabelClass) {
  test_data::WritePngFolder(dir(), 5, /*labeled=*/false);
  auto data = LoadPngDataset(dir(), kShape, 10);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_TRUE(data->labels.eq(10).all().item<bool>());
}

TEST_F(DatasetTest, IdxStillWorks) {
  test_data::WriteSplit(dir(), "train", 12);
  auto data = LoadDataset(dir(), "train", kShape, 10);
  ASSERT_TRUE(data.ok()) << data.status();
  EXPECT_EQ(data->size(), 12);
  EXPECT_EQ(data->labels[11].item<int64_t>(), 1);  // not shuffled
}

TEST_F(DatasetTest, BadPngFoldersFailNamingTheProblem) {
  auto empty = LoadDataset(dir(), "train", kShape, 10);
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(std::string(empty.status().message()), HasSubstr("no *.png"));

  test_data::WritePngFolder(dir() + "/big", 1, false, /*size=*/32);
  auto big = LoadPngDataset(dir() + "/big", kShape, 10);
  ASSERT_FALSE(big.ok());
  EXPECT_THAT(std::string(big.status().message()),
              HasSubstr("shape mismatch"));

  test_data::WritePngFolder(dir() + "/cls", 2, true);
  fs::create_directories(dir() + "/cls/shoes");
  auto named = LoadPngDataset(dir() + "/cls", kShape, 10);
  ASSERT_FALSE(named.ok());
  EXPECT_THAT(std::string(named.status().message()), HasSubstr("shoes"));

  test_data::WritePngFolder(dir() + "/cls2", 12, true);
  auto out_of_range = LoadPngDataset(dir() + "/cls2", kShape, 5);
  ASSERT_FALSE(out_of_range.ok());
  EXPECT_THAT(std::string(out_of_range.status().message()),
              HasSubstr("class number 0..4"));

  test_data::WritePngFolder(dir() + "/mixed", 2, true);
  test_data::WritePngFolder(dir() + "/mixed", 1, false);
  auto mixed = LoadPngDataset(dir() + "/mixed", kShape, 10);
  ASSERT_FALSE(mixed.ok());
  EXPECT_THAT(std::string(mixed.status().message()), HasSubstr("both"));

  fs::create_directories(dir() + "/junk");
  std::ofstream(dir() + "/junk/a.png") << "not a png";
  auto junk = LoadPngDataset(dir() + "/junk", kShape, 10);
  ASSERT_FALSE(junk.ok());
  EXPECT_THAT(std::string(junk.status().message()), HasSubstr("a.png"));
}

TEST(MutatePixelsTest, DeterministicAndReplacesAboutTheRate) {
  const at::Tensor images =
      at::full({64, 1, 28, 28}, 7, at::TensorOptions(at::kByte));
  at::Generator a = at::detail::createCPUGenerator(5);
  at::Generator b = at::detail::createCPUGenerator(5);
  at::Generator c = at::detail::createCPUGenerator(6);
  const at::Tensor ma = MutatePixels(images, 0.2, a);
  const at::Tensor mb = MutatePixels(images, 0.2, b);
  const at::Tensor mc = MutatePixels(images, 0.2, c);
  EXPECT_TRUE(at::equal(ma, mb));   // same seed, same mutation
  EXPECT_FALSE(at::equal(ma, mc));  // another seed, another one
  EXPECT_EQ(ma.scalar_type(), at::kByte);
  EXPECT_EQ(ma.sizes(), images.sizes());
  // A replaced pixel keeps 7 with probability 1/256: the changed fraction is
  // 0.2 * 255/256 = 0.199; 50176 pixels give a standard error of 0.0018.
  const double changed = ma.ne(7).to(at::kDouble).mean().item<double>();
  EXPECT_NEAR(changed, 0.2 * 255.0 / 256.0, 0.01);
  // Replacement values are uniform over 0..255: mean about 127.5.
  const at::Tensor replaced = ma.masked_select(ma.ne(7)).to(at::kDouble);
  EXPECT_NEAR(replaced.mean().item<double>(), 127.5, 3.0);
  EXPECT_TRUE(at::equal(MutatePixels(images, 0.0, a), images));  // rate 0
}

TEST(WithoutClassTest, DropsExactlyThatClass) {
  Dataset data{at::arange(20, at::kLong).to(at::kByte).reshape({20, 1, 1, 1}),
               at::arange(20, at::kLong).remainder(4)};
  const Dataset kept = WithoutClass(data, 2);
  ASSERT_EQ(kept.size(), 15);
  EXPECT_EQ(kept.labels.eq(2).sum().item<int64_t>(), 0);
  // The images keep their order and stay with their labels.
  EXPECT_EQ(kept.images[2].item<uint8_t>(), 3);
  EXPECT_EQ(kept.labels[2].item<int64_t>(), 3);
  EXPECT_EQ(WithoutClass(data, 7).size(), 20);  // no such images
}

}  // namespace
}  // namespace vdm
