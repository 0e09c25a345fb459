// Resuming a run from its training state (model/train/trainer_state.cc).
#include <torch/script.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/train/trainer.h"
#include "model/vdm/torchscript_model.h"
#include "tests/model/train/test_data.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using test_data::SmallOptions;
using test_data::TrainDir;

// The parameters of a saved TorchScript model, in named order.
std::vector<at::Tensor> LoadParams(const std::string& path) {
  torch::jit::Module module = torch::jit::load(path);
  std::vector<at::Tensor> out;
  for (const auto& p : module.named_parameters()) out.push_back(p.value);
  return out;
}

// Trains `steps` steps (resuming when asked) and returns the EMA weights.
std::vector<at::Tensor> Train(Trainer::Options options, int64_t steps,
                              bool resume) {
  options.steps = steps;
  options.resume = resume;
  auto trainer = Trainer::Create(options);
  EXPECT_TRUE(trainer.ok()) << trainer.status();
  if (!trainer.ok()) return {};
  auto summary = (*trainer)->Run();
  EXPECT_TRUE(summary.ok()) << summary.status();
  return LoadParams(options.out_path);
}

void ExpectSame(const std::vector<at::Tensor>& a,
                const std::vector<at::Tensor>& b) {
  ASSERT_EQ(a.size(), b.size());
  ASSERT_FALSE(a.empty());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(at::equal(a[i], b[i]))
        << "tensor " << i << " differs by "
        << (a[i] - b[i]).abs().max().item<double>();
  }
}

class TrainerStateTest : public ::testing::Test {
 protected:
  void SetUp() override { SetTorchThreads(1); }
};

TEST_F(TrainerStateTest, StraightAndResumedRunsGiveTheSameWeights) {
  TrainDir straight_dir("state_straight"), resumed_dir("state_resumed");
  Trainer::Options straight = SmallOptions(straight_dir);
  Trainer::Options resumed = SmallOptions(resumed_dir);
  for (Trainer::Options* o : {&straight, &resumed}) {
    o->eval_every = 3;  // an evaluation must not disturb the training RNG
    o->checkpoint_every = 0;
    o->test_images = 0;
    o->warmup_steps = 4;  // the learning rate changes across the break
  }
  // 10 steps of batch 8 over 48 images: the break (step 5) and the end
  // both fall inside an epoch, so the data order must be restored too.
  const auto want = Train(straight, 10, /*resume=*/false);
  Train(resumed, 5, /*resume=*/false);
  EXPECT_TRUE(fs::exists(resumed.out_path + ".state"));
  const auto got = Train(resumed, 10, /*resume=*/true);
  ExpectSame(want, got);  // bitwise: same ops, same thread count
}

TEST_F(TrainerStateTest, StopFlagWritesAResumableState) {
  TrainDir straight_dir("stop_straight"), resumed_dir("stop_resumed");
  Trainer::Options straight = SmallOptions(straight_dir);
  straight.test_images = 0;
  const auto want = Train(straight, 6, /*resume=*/false);

  Trainer::Options resumed = SmallOptions(resumed_dir);
  resumed.test_images = 0;
  std::atomic<bool> stop{false};
  resumed.stop = &stop;
  resumed.steps = 6;
  auto trainer = Trainer::Create(resumed);
  ASSERT_TRUE(trainer.ok());
  // Three steps by hand, then the signal: Run() stops before its first.
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE((*trainer)->TrainStep(
        (*trainer)->train_data().images.slice(0, 8 * i, 8 * i + 8),
        (*trainer)->train_data().labels.slice(0, 8 * i, 8 * i + 8)).ok());
  }
  stop = true;
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_TRUE(summary->interrupted);
  trainer->reset();
  stop = false;
  resumed.resume = true;
  auto again = Trainer::Create(resumed);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ((*again)->step(), 3);
}

TEST_F(TrainerStateTest, ResumeWithoutStateFailsNamingThePath) {
  TrainDir dir("state_missing");
  Trainer::Options options = SmallOptions(dir);
  options.resume = true;
  auto trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr(dir.out() + ".state"));
}

TEST_F(TrainerStateTest, ResumeDefaultsInitToTheCheckpoint) {
  TrainDir dir("state_no_init");
  Trainer::Options options = SmallOptions(dir);
  options.test_images = 0;
  Train(options, 2, /*resume=*/false);
  options.init_path.clear();
  options.resume = true;
  options.steps = 4;
  auto trainer = Trainer::Create(options);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  EXPECT_EQ((*trainer)->step(), 2);
  auto summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->first_step, 2);
  EXPECT_EQ(summary->steps, 4);
}

TEST_F(TrainerStateTest, ResumeWithOtherDataFails) {
  TrainDir dir("state_other_data");
  Trainer::Options options = SmallOptions(dir);
  options.test_images = 0;
  Train(options, 2, /*resume=*/false);
  options.eval_images = 8;  // 56 training images instead of 48
  options.resume = true;
  auto trainer = Trainer::Create(options);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()),
              HasSubstr("48 training images"));
}

}  // namespace
}  // namespace vdm

namespace vdm {
namespace {

// With --schedule=learned the schedule's parameters, their EMA and their
// AdamW moments are in the state: a resumed run matches a straight one
// bitwise, schedule included; resuming with another schedule is refused.
TEST_F(TrainerStateTest, ResumeWithALearnedScheduleIsExact) {
  TrainDir straight_dir("sched_straight"), resumed_dir("sched_resumed");
  Trainer::Options straight = SmallOptions(straight_dir);
  Trainer::Options resumed = SmallOptions(resumed_dir);
  for (Trainer::Options* o : {&straight, &resumed}) {
    o->init_path = std::string(VDM_TEST_MODELS_DIR) + "/tiny_learned.pt";
    o->schedule = ScheduleKind::kLearned;
    o->eval_every = 3;
    o->checkpoint_every = 0;
    o->test_images = 0;
    o->warmup_steps = 4;
    o->lr = 1e-2;
  }
  const auto want = Train(straight, 8, /*resume=*/false);
  Train(resumed, 4, /*resume=*/false);
  const auto got = Train(resumed, 8, /*resume=*/true);
  ExpectSame(want, got);
  // The schedule trained (so the comparison covers it).
  torch::jit::Module initial = torch::jit::load(straight.init_path);
  torch::jit::Module trained = torch::jit::load(straight.out_path);
  auto a = initial.attr("gamma_net").toModule().named_parameters();
  auto b = trained.attr("gamma_net").toModule().named_parameters();
  bool moved = false;
  for (auto ia = a.begin(), ib = b.begin(); ia != a.end(); ++ia, ++ib) {
    moved = moved || !at::equal((*ia).value, (*ib).value);
  }
  EXPECT_TRUE(moved);

  Trainer::Options other = resumed;
  other.resume = true;
  other.schedule = ScheduleKind::kLearnedEndpoints;
  auto refused = Trainer::Create(other);
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("--schedule=learned"));
}

}  // namespace
}  // namespace vdm
