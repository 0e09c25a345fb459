#include "model/train/trainer.h"

#include <atomic>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/vdm/image_io.h"
#include "model/vdm/torchscript_model.h"
#include "tests/model/train/test_data.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

const std::string kTinyModel = std::string(VDM_TEST_MODELS_DIR) + "/tiny.pt";

using test_data::TrainDir;
using test_data::WriteSplit;

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::make_unique<TrainDir>(
        std::string("trainer_test_") +
        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    SetTorchThreads(1);  // robust timing on a shared machine
  }
  void TearDown() override { dir_.reset(); }

  std::string data_dir() const { return dir_->data(); }
  std::string out_path() const { return dir_->out(); }
  Trainer::Options SmallOptions() const { return test_data::SmallOptions(*dir_); }

  std::unique_ptr<TrainDir> dir_;
  fs::path dir() const { return dir_->path(); }
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

  // A run from this checkpoint (here an evaluation, steps=0) keeps the
  // first run's training block in training_history.
  Trainer::Options again = SmallOptions();
  again.init_path = out_path();
  again.out_path = (dir() / "evaluated.pt").string();
  again.steps = 0;
  auto evaluation = Trainer::Create(again);
  ASSERT_TRUE(evaluation.ok()) << evaluation.status();
  ASSERT_TRUE((*evaluation)->Run().ok());
  load.path = again.out_path;
  auto evaluated = TorchScriptModel::Load(load);
  ASSERT_TRUE(evaluated.ok()) << evaluated.status();
  const auto meta2 = nlohmann::json::parse((*evaluated)->metadata());
  EXPECT_EQ(meta2.at("steps").get<int64_t>(), 4);
  EXPECT_EQ(meta2.at("training").at("steps").get<int64_t>(), 0);
  ASSERT_EQ(meta2.at("training_history").size(), 1u);
  EXPECT_EQ(meta2.at("training_history")[0].at("steps").get<int64_t>(), 4);
  EXPECT_EQ(meta2.at("training_history")[0].at("batch").get<int64_t>(), 8);
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

TEST_F(TrainerTest, LearningRateWarmsUpAndCoolsDown) {
  Trainer::Options options = SmallOptions();
  options.lr = 1e-3;
  options.steps = 10;
  options.warmup_steps = 2;
  options.cooldown_steps = 4;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const std::vector<double> expected = {0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25};
  for (int64_t step = 0; step < 10; ++step) {
    EXPECT_NEAR((*trainer)->LearningRateAt(step), 1e-3 * expected[step], 1e-12)
        << "step " << step;
  }
  // The optimizer gets that rate: the metrics log the rate of each step.
  options.log_every = 1;
  options.eval_every = 0;
  options.test_images = 0;
  options.samples_per_class = 0;
  trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  std::ifstream in(out_path() + ".metrics.jsonl");
  std::vector<double> logged;
  for (std::string line; std::getline(in, line);) {
    const auto r = nlohmann::json::parse(line);
    if (r.at("kind") == "train") logged.push_back(r.at("lr").get<double>());
  }
  ASSERT_EQ(logged.size(), 10u);
  for (size_t i = 0; i < logged.size(); ++i) {
    EXPECT_NEAR(logged[i], 1e-3 * expected[i], 1e-12) << "step " << i;
  }

  options.cooldown_steps = -1;
  EXPECT_EQ(Trainer::Create(options).status().code(),
            absl::StatusCode::kInvalidArgument);
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
  options.data_dir = (dir() / "nowhere").string();
  auto trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr(options.data_dir));
}

TEST_F(TrainerTest, MissingFileFailsAtCreate) {
  fs::remove(dir() / "data" / "t10k-labels-idx1-ubyte");
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
  options.out_path = (dir() / "no_such_dir" / "out.pt").string();
  trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("no_such_dir"));
}

TEST_F(TrainerTest, WritesMetricsCurveAndSampleGrid) {
  Trainer::Options options = SmallOptions();
  options.samples_per_class = 3;
  options.sample_steps = 4;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());

  std::ifstream in(out_path() + ".metrics.jsonl");
  std::vector<nlohmann::json> records;
  for (std::string line; std::getline(in, line);) {
    records.push_back(nlohmann::json::parse(line));
  }
  int train = 0, validation = 0, test = 0;
  for (const auto& r : records) {
    const std::string kind = r.at("kind");
    if (kind == "train") {
      ++train;
      EXPECT_TRUE(r.contains("loss") && r.contains("lr") &&
                  r.contains("steps_per_s"));
    } else if (kind == "validation") {
      ++validation;
      EXPECT_TRUE(r.contains("prior_bpd") && r.contains("diffusion_bpd"));
    } else if (kind == "test") {
      ++test;
    }
  }
  EXPECT_EQ(train, 2);       // log_every 2 over 4 steps
  EXPECT_EQ(validation, 2);  // steps 2 and 4
  EXPECT_EQ(test, 1);

  auto curve = ReadFile(out_path() + ".curve.png");
  ASSERT_TRUE(curve.ok()) << curve.status();
  auto curve_image = DecodePng(*curve);
  ASSERT_TRUE(curve_image.ok());
  EXPECT_EQ(curve_image->channels, 3);
  EXPECT_EQ(curve_image->width, 640);
  auto samples = ReadFile(out_path() + ".samples.png");
  ASSERT_TRUE(samples.ok()) << samples.status();
  auto grid = DecodePng(*samples);
  ASSERT_TRUE(grid.ok());
  // 10 rows (classes) of 3 images, 28 px and a 2 px border.
  EXPECT_EQ(grid->height, 10 * 30 + 2);
  EXPECT_EQ(grid->width, 3 * 30 + 2);
}

TEST_F(TrainerTest, WeightingChangesTheLossButNotTheEvaluation) {
  Trainer::Options elbo = SmallOptions();
  Trainer::Options sigmoid = elbo;
  sigmoid.weighting.kind = Weighting::Kind::kSigmoid;
  auto a = Trainer::Create(elbo);
  auto b = Trainer::Create(sigmoid);
  ASSERT_TRUE(a.ok() && b.ok());
  EvalOptions eval;
  eval.times = 2;
  eval.seed = 3;
  const Dataset& val = (*a)->validation_data();
  auto eval_a = (*a)->Evaluate(val, /*use_ema=*/false, eval);
  auto eval_b = (*b)->Evaluate(val, /*use_ema=*/false, eval);
  ASSERT_TRUE(eval_a.ok() && eval_b.ok());
  EXPECT_DOUBLE_EQ(eval_a->bpd, eval_b->bpd);  // the VLB either way

  const Dataset batch = (*a)->train_data().Slice(0, 8);
  auto loss_a = (*a)->TrainStep(batch.images, batch.labels);
  auto loss_b = (*b)->TrainStep(batch.images, batch.labels);
  ASSERT_TRUE(loss_a.ok() && loss_b.ok());
  // Same seed => same times and noise: w <= 1 lowers the diffusion term.
  EXPECT_LT(*loss_b, *loss_a);
}

// --precision=bf16: the forward pass runs under autocast (the loss at the
// same seed moves by bf16's rounding, not by more), the weights, their
// gradients' updates and the evaluation stay fp32, and the metadata says so.
TEST_F(TrainerTest, Bf16TrainsUnderAutocastWithFp32Weights) {
  Trainer::Options fp32 = SmallOptions();
  Trainer::Options bf16 = fp32;
  bf16.precision = "bf16";
  auto a = Trainer::Create(fp32);
  auto b = Trainer::Create(bf16);
  ASSERT_TRUE(a.ok() && b.ok());
  const Dataset batch = (*a)->train_data().Slice(0, 8);
  for (int step = 0; step < 3; ++step) {
    auto loss_a = (*a)->TrainStep(batch.images, batch.labels);
    auto loss_b = (*b)->TrainStep(batch.images, batch.labels);
    ASSERT_TRUE(loss_a.ok() && loss_b.ok());
    ASSERT_TRUE(std::isfinite(*loss_b));
    // Same seed, times and noise: only the arithmetic differs.
    EXPECT_NE(*loss_a, *loss_b) << "step " << step << ": autocast not active?";
    EXPECT_NEAR(*loss_b, *loss_a, 0.05 * std::abs(*loss_a)) << "step " << step;
  }
  EvalOptions eval;
  eval.times = 2;
  eval.seed = 3;
  auto eval_b = (*b)->Evaluate((*b)->validation_data(), false, eval);
  ASSERT_TRUE(eval_b.ok());
  EXPECT_TRUE(std::isfinite(eval_b->bpd));

  ASSERT_TRUE((*b)->Run().ok());
  auto loaded = TorchScriptModel::Load({out_path()});
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  auto meta = nlohmann::json::parse((*loaded)->metadata());
  EXPECT_EQ(meta["training"]["precision"], "bf16");
  for (const auto& p : (*loaded)->module().parameters()) {
    EXPECT_EQ(p.scalar_type(), at::kFloat);  // fp32 master weights
  }

  Trainer::Options bad = fp32;
  bad.precision = "fp16";
  auto refused = Trainer::Create(bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("precision must be fp32 or bf16, got 'fp16'"));
}

TEST_F(TrainerTest, ExcludeClassLeavesOutItsImages) {
  Trainer::Options options = SmallOptions();
  options.exclude_class = 3;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  // 64 training images with labels i % 10: 7 of class 3 (i = 3, 13, ..., 63)
  // leave 57, the last 16 held out for validation; 32 test images: 3 of it.
  EXPECT_EQ((*trainer)->train_data().size(), 41);
  EXPECT_EQ((*trainer)->validation_data().size(), 16);
  EXPECT_EQ((*trainer)->test_data().size(), 29);
  for (const Dataset* d : {&(*trainer)->train_data(),
                           &(*trainer)->validation_data(),
                           &(*trainer)->test_data()}) {
    EXPECT_EQ(d->labels.eq(3).sum().item<int64_t>(), 0);
  }
  options.exclude_class = 10;  // the tiny model has classes 0..9
  trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("exclude_class"));
}

TEST_F(TrainerTest, MutationRateIsValidatedAndRecorded) {
  Trainer::Options options = SmallOptions();
  for (double bad : {-0.1, 1.0, std::nan("")}) {
    options.mutation_rate = bad;
    auto trainer = Trainer::Create(options);
    ASSERT_FALSE(trainer.ok()) << bad;
    EXPECT_THAT(std::string(trainer.status().message()),
                HasSubstr("mutation_rate"));
  }
  options.mutation_rate = 0.2;
  options.steps = 2;
  options.test_images = 0;
  options.eval_every = 0;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  TorchScriptModel::Options load;
  load.path = out_path();
  auto model = TorchScriptModel::Load(load);
  ASSERT_TRUE(model.ok()) << model.status();
  const auto meta = nlohmann::json::parse((*model)->metadata());
  EXPECT_DOUBLE_EQ(meta.at("training").at("mutation_rate").get<double>(), 0.2);
}

}  // namespace
}  // namespace vdm

namespace vdm {
namespace {

const std::string kTinyLearned =
    std::string(VDM_TEST_MODELS_DIR) + "/tiny_learned.pt";

// name -> tensor of a saved model's schedule parameters.
std::map<std::string, at::Tensor> ScheduleParams(const std::string& path) {
  torch::jit::Module m = torch::jit::load(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters()) {
    if (p.name.rfind("gamma_", 0) == 0) out[p.name] = p.value.clone();
  }
  return out;
}

class ScheduleTrainingTest : public TrainerTest {};

TEST_F(ScheduleTrainingTest, EachKindTrainsOnlyItsPartOfGamma) {
  const auto initial = ScheduleParams(kTinyLearned);
  ASSERT_EQ(initial.size(), 7u);
  for (ScheduleKind kind : {ScheduleKind::kFixed,
                            ScheduleKind::kLearnedEndpoints,
                            ScheduleKind::kLearned}) {
    SCOPED_TRACE(ScheduleName(kind));
    Trainer::Options options = SmallOptions();
    options.init_path = kTinyLearned;
    options.schedule = kind;
    options.lr = 1e-2;
    options.ema_decay = 0;  // the served weights are the trained ones
    options.test_images = 0;
    auto trainer = Trainer::Create(options);
    ASSERT_TRUE(trainer.ok()) << trainer.status();
    ASSERT_TRUE((*trainer)->Run().ok());
    const auto trained = ScheduleParams(out_path());
    for (const auto& [name, before] : initial) {
      const bool endpoint = name.find('.') == std::string::npos;
      const bool should_move =
          kind == ScheduleKind::kLearned ||
          (kind == ScheduleKind::kLearnedEndpoints && endpoint);
      EXPECT_EQ(!at::equal(before, trained.at(name)), should_move) << name;
    }
    // The metadata records the kind and gamma at 11 points; the schedule
    // plot is beside the learning curve.
    auto model = TorchScriptModel::Load({out_path()});
    ASSERT_TRUE(model.ok()) << model.status();
    const auto meta = nlohmann::json::parse((*model)->metadata());
    EXPECT_EQ(meta["schedule"]["kind"], ScheduleName(kind));
    EXPECT_EQ(meta["schedule"]["shape"], "monotone network");
    EXPECT_EQ(meta["training"]["schedule"], ScheduleName(kind));
    ASSERT_EQ(meta["schedule"]["gamma"].size(), 11u);
    auto g = (*model)->Gamma(at::linspace(0.0, 1.0, 11, at::kFloat));
    ASSERT_TRUE(g.ok());
    for (int i = 0; i < 11; ++i) {
      EXPECT_NEAR(meta["schedule"]["gamma"][i].get<double>(),
                  g->gamma[i].item<double>(), 1e-5);
    }
    auto png = ReadFile(out_path() + ".schedule.png");
    ASSERT_TRUE(png.ok()) << png.status();
    EXPECT_TRUE(DecodePng(*png).ok());
  }
}

TEST_F(ScheduleTrainingTest, LearnedNeedsAModelWithALearnedShape) {
  Trainer::Options options = SmallOptions();  // tiny.pt: linear gamma
  options.schedule = ScheduleKind::kLearned;
  auto trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("no gamma_net.* parameters"));
  // The endpoints of the linear schedule can be learned.
  options.schedule = ScheduleKind::kLearnedEndpoints;
  options.test_images = 0;
  trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  ASSERT_TRUE((*trainer)->Run().ok());
  auto model = TorchScriptModel::Load({out_path()});
  ASSERT_TRUE(model.ok()) << model.status();
  EXPECT_EQ(nlohmann::json::parse((*model)->metadata())["schedule"]["shape"],
            "linear");
}

}  // namespace
}  // namespace vdm
