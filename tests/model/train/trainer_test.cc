#include "model/train/trainer.h"

#include <unistd.h>
#include <zlib.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/vdm/torchscript_model.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kTinyModel = std::string(VDM_TEST_MODELS_DIR) + "/tiny.pt";

// An IDX file of unsigned bytes, gzip-compressed when the name ends in .gz.
void WriteIdx(const std::string& path, const std::vector<int32_t>& dims,
              const std::vector<uint8_t>& data) {
  std::string bytes = {0, 0, 0x08, static_cast<char>(dims.size())};
  for (int32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      bytes.push_back(static_cast<char>((d >> shift) & 0xff));
    }
  }
  bytes.append(data.begin(), data.end());
  if (path.size() > 3 && path.substr(path.size() - 3) == ".gz") {
    gzFile f = gzopen(path.c_str(), "wb");
    ASSERT_NE(f, nullptr) << path;
    ASSERT_EQ(gzwrite(f, bytes.data(), bytes.size()),
              static_cast<int>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary) << bytes;
  }
}

// `n` structured size x size images: a bright bar whose row depends on the
// label (i % 10), on a dark noisy background.
void WriteSplit(const std::string& dir, const std::string& split, int n,
                int size = 28, int label_offset = 0) {
  std::mt19937 rng(n * 31 + size);
  std::uniform_int_distribution<int> noise(0, 40);
  std::vector<uint8_t> images(static_cast<size_t>(n) * size * size);
  std::vector<uint8_t> labels(n);
  for (int i = 0; i < n; ++i) {
    labels[i] = static_cast<uint8_t>(i % 10 + label_offset);
    const int bar = 2 + 2 * (i % 10);
    for (int y = 0; y < size; ++y) {
      for (int x = 0; x < size; ++x) {
        const bool on = std::abs(y - bar) <= 1 && x > 3 && x < size - 4;
        images[(static_cast<size_t>(i) * size + y) * size + x] =
            static_cast<uint8_t>(on ? 220 + noise(rng) / 2 : noise(rng));
      }
    }
  }
  WriteIdx(dir + "/" + split + "-images-idx3-ubyte.gz", {n, size, size},
           images);
  WriteIdx(dir + "/" + split + "-labels-idx1-ubyte", {n}, labels);
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("vdm_trainer_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "data");
    WriteSplit(data_dir(), "train", 64);
    WriteSplit(data_dir(), "t10k", 32);
    SetTorchThreads(1);  // robust timing on a shared machine
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string data_dir() const { return (dir_ / "data").string(); }
  std::string out_path() const { return (dir_ / "out.pt").string(); }

  Trainer::Options SmallOptions() const {
    Trainer::Options o;
    o.data_dir = data_dir();
    o.init_path = kTinyModel;
    o.out_path = out_path();
    o.steps = 4;
    o.batch_size = 8;
    o.warmup_steps = 2;
    o.eval_every = 2;
    o.eval_images = 16;
    o.test_images = 32;
    o.eval_times = 2;
    o.eval_batch = 32;
    o.eval_conditional = true;
    o.checkpoint_every = 2;
    o.log_every = 2;
    o.log = nullptr;
    return o;
  }

  fs::path dir_;
};

TEST_F(TrainerTest, TrainsAndWritesLoadableCheckpoint) {
  auto trainer = Trainer::Create(SmallOptions());
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  EXPECT_EQ((*trainer)->train_data().size(), 48);
  EXPECT_EQ((*trainer)->validation_data().size(), 16);
  EXPECT_EQ((*trainer)->test_data().size(), 32);

  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->steps, 4);
  EXPECT_FALSE(summary->interrupted);
  EXPECT_TRUE(std::isfinite(summary->last_loss_bpd));
  EXPECT_GT(summary->last_loss_bpd, 0);
  ASSERT_TRUE(summary->test.has_value());
  EXPECT_TRUE(std::isfinite(summary->test->bpd));
  EXPECT_EQ(summary->test->images, 32);
  EXPECT_NEAR(
      summary->test->bpd,
      summary->test->prior + summary->test->recon + summary->test->diffusion,
      1e-6);
  EXPECT_GT(summary->test->stderr_bpd, 0);
  ASSERT_TRUE(summary->test_conditional.has_value());
  EXPECT_TRUE(summary->test_conditional->conditional);
  ASSERT_TRUE(summary->validation.has_value());
  EXPECT_FALSE(fs::exists(out_path() + ".tmp"));

  TorchScriptModel::Options load;
  load.path = out_path();
  auto model = TorchScriptModel::Load(load);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto meta = nlohmann::json::parse((*model)->metadata());
  EXPECT_EQ(meta.at("steps").get<int64_t>(), 4);
  EXPECT_DOUBLE_EQ(meta.at("test_bpd").get<double>(), summary->test->bpd);
  EXPECT_EQ(meta.at("test").at("images").get<int64_t>(), 32);
  EXPECT_TRUE(meta.contains("test_bpd_conditional"));
  EXPECT_EQ(meta.at("training").at("batch").get<int64_t>(), 8);
  EXPECT_EQ(meta.at("training").at("interrupted").get<bool>(), false);
  EXPECT_EQ(meta.at("dataset").at("train_images").get<int64_t>(), 48);
  EXPECT_TRUE(meta.at("validation").contains("bpd"));
}

TEST_F(TrainerTest, FixedBatchTrainingLowersTheLoss) {
  Trainer::Options options = SmallOptions();
  options.lr = 2e-3;
  options.warmup_steps = 0;
  options.label_dropout = 0;
  options.test_images = 0;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const Dataset batch = (*trainer)->train_data().Slice(0, 8);
  EvalOptions eval;
  eval.times = 8;
  eval.conditional = true;
  eval.seed = 7;
  auto before = (*trainer)->Evaluate(batch, /*use_ema=*/false, eval);
  ASSERT_TRUE(before.ok()) << before.status();
  // The same seed gives the same estimate (common random numbers).
  auto again = (*trainer)->Evaluate(batch, /*use_ema=*/false, eval);
  ASSERT_TRUE(again.ok());
  EXPECT_DOUBLE_EQ(before->bpd, again->bpd);

  for (int i = 0; i < 30; ++i) {
    auto loss = (*trainer)->TrainStep(batch.images, batch.labels);
    ASSERT_TRUE(loss.ok()) << loss.status();
    ASSERT_TRUE(std::isfinite(*loss));
  }
  EXPECT_EQ((*trainer)->step(), 30);
  auto after = (*trainer)->Evaluate(batch, /*use_ema=*/false, eval);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_LT(after->bpd, before->bpd - 1.0)
      << "before " << before->bpd << " after " << after->bpd;
  // The EMA weights follow the trained ones.
  auto ema = (*trainer)->Evaluate(batch, /*use_ema=*/true, eval);
  ASSERT_TRUE(ema.ok()) << ema.status();
  EXPECT_LT(ema->bpd, before->bpd);
}

TEST_F(TrainerTest, TrainsUnconditionalVPredictionModel) {
  Trainer::Options options = SmallOptions();
  options.init_path = std::string(VDM_TEST_MODELS_DIR) + "/tiny_uncond_v.pt";
  options.steps = 2;
  options.eval_every = 0;
  options.test_images = 8;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  EXPECT_EQ((*trainer)->model_info().num_classes, 0);
  EXPECT_EQ((*trainer)->model_info().prediction, "v");
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  ASSERT_TRUE(summary->test.has_value());
  EXPECT_TRUE(std::isfinite(summary->test->bpd));
  EXPECT_FALSE(summary->test_conditional.has_value());
}

TEST_F(TrainerTest, StopFlagWritesCheckpointAndReturns) {
  std::atomic<bool> stop{true};
  Trainer::Options options = SmallOptions();
  options.stop = &stop;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_TRUE(summary->interrupted);
  EXPECT_EQ(summary->steps, 0);
  EXPECT_FALSE(summary->test.has_value());
  TorchScriptModel::Options load;
  load.path = out_path();
  auto model = TorchScriptModel::Load(load);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto meta = nlohmann::json::parse((*model)->metadata());
  EXPECT_TRUE(meta.at("training").at("interrupted").get<bool>());
  EXPECT_FALSE(meta.contains("test_bpd"));
}

TEST_F(TrainerTest, MissingDataDirFailsAtCreate) {
  Trainer::Options options = SmallOptions();
  options.data_dir = (dir_ / "nowhere").string();
  auto trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr(options.data_dir));
}

TEST_F(TrainerTest, MissingFileFailsAtCreate) {
  fs::remove(dir_ / "data" / "t10k-labels-idx1-ubyte");
  auto trainer = Trainer::Create(SmallOptions());
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("t10k-labels-idx1-ubyte"));
}

TEST_F(TrainerTest, WrongImageShapeFailsAtCreate) {
  WriteSplit(data_dir(), "train", 64, /*size=*/32);
  auto trainer = Trainer::Create(SmallOptions());
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("shape mismatch"));
  EXPECT_THAT(std::string(trainer.status().message()), HasSubstr("1x32x32"));
}

TEST_F(TrainerTest, LabelOutOfRangeFailsAtCreate) {
  WriteSplit(data_dir(), "train", 64, 28, /*label_offset=*/5);
  auto trainer = Trainer::Create(SmallOptions());
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("out of range"));
}

TEST_F(TrainerTest, BadOptionsFailAtCreate) {
  Trainer::Options options = SmallOptions();
  options.eval_images = 60;  // leaves 4 training images, fewer than a batch
  auto trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()), HasSubstr("batch"));

  options = SmallOptions();
  options.out_path = (dir_ / "no_such_dir" / "out.pt").string();
  trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("no_such_dir"));
}

}  // namespace
}  // namespace vdm
