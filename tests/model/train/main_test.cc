// The vdm-train binary (model/train/main.cc) as a user runs it: killed with
// SIGKILL or stopped with SIGTERM after a checkpoint, then resumed, it ends
// with the same weights as an uninterrupted run; bad flags fail at start.
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <torch/script.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/model/train/test_data.h"

extern char** environ;

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using test_data::TrainDir;

const std::string kBinary = std::string(VDM_BINARY_DIR) + "/vdm-train";

std::vector<std::string> Flags(const TrainDir& dir, const std::string& out) {
  return {kBinary, "--init=" + test_data::TinyModel(), "--out=" + out,
          "--data=" + dir.data(), "--steps=60", "--batch=8",
          "--warmup_steps=4", "--eval_images=16", "--test_images=0",
          "--eval_every=0", "--checkpoint_every=5", "--log_every=0",
          "--threads=1", "--pictures=false"};
}

pid_t Spawn(const std::vector<std::string>& args) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  pid_t pid = -1;
  const int rc =
      posix_spawn(&pid, argv[0], &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  return rc == 0 ? pid : -1;
}

int Wait(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

std::vector<at::Tensor> LoadParams(const std::string& path) {
  torch::jit::Module module = torch::jit::load(path);
  std::vector<at::Tensor> out;
  for (const auto& p : module.named_parameters()) out.push_back(p.value);
  return out;
}

// Runs to the end, interrupts a second run with `sig` once its first state
// file exists, resumes it, and compares the final weights.
void InterruptAndResume(int sig, const std::string& name) {
  TrainDir dir(name);
  const std::string straight = dir.path() + "/straight.pt";
  const std::string broken = dir.path() + "/broken.pt";
  ASSERT_EQ(Wait(Spawn(Flags(dir, straight))), 0);

  const pid_t pid = Spawn(Flags(dir, broken));
  ASSERT_GT(pid, 0);
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(broken + ".state") &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  ASSERT_TRUE(fs::exists(broken + ".state"));
  kill(pid, sig);
  const int status = Wait(pid);
  if (sig == SIGKILL) {
    ASSERT_TRUE(WIFSIGNALED(status))
        << "the run finished before it could be killed";
  } else {
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
  std::vector<std::string> resume = Flags(dir, broken);
  resume.push_back("--resume");
  ASSERT_EQ(Wait(Spawn(resume)), 0);

  const auto want = LoadParams(straight), got = LoadParams(broken);
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(at::equal(want[i], got[i])) << "parameter " << i;
  }
}

TEST(VdmTrainMainTest, KilledRunResumesFromItsLastCheckpoint) {
  InterruptAndResume(SIGKILL, "main_sigkill");
}

TEST(VdmTrainMainTest, TerminatedRunResumes) {
  InterruptAndResume(SIGTERM, "main_sigterm");
}

std::string RunCapture(const std::string& args, int* status) {
  std::string out;
  FILE* pipe = popen((kBinary + " " + args + " 2>&1").c_str(), "r");
  char buf[512];
  while (pipe != nullptr && std::fgets(buf, sizeof(buf), pipe) != nullptr) {
    out += buf;
  }
  *status = pipe != nullptr ? pclose(pipe) : -1;
  return out;
}

TEST(VdmTrainMainTest, BadFlagsFailAtStartWithAMessage) {
  TrainDir dir("main_bad_flags");
  const std::string base = "--init=" + test_data::TinyModel() +
                           " --out=" + dir.out() + " --data=" + dir.data() +
                           " --eval_images=16 --test_images=0 --batch=8";
  int status = 0;
  std::string out = RunCapture(base + " --weighting=mse", &status);
  EXPECT_NE(status, 0);
  EXPECT_THAT(out, HasSubstr("unknown loss weighting 'mse'"));
  out = RunCapture(base + " --resume", &status);
  EXPECT_NE(status, 0);
  EXPECT_THAT(out, HasSubstr("no training state"));
  out = RunCapture("--init=" + test_data::TinyModel() + " --out=" + dir.out() +
                       " --data=" + dir.path() + "/nowhere",
                   &status);
  EXPECT_NE(status, 0);
  EXPECT_THAT(out, HasSubstr("nowhere"));
}

}  // namespace
}  // namespace vdm
