#include "model/vdm/cpus.h"

#include <filesystem>
#include <fstream>
#include <string>

#include <unistd.h>

#include "gtest/gtest.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;

TEST(CpusTest, ParsesCgroupV2CpuMax) {
  EXPECT_EQ(ParseCpuMax("200000 100000\n"), 2.0);
  EXPECT_EQ(ParseCpuMax("150000 100000"), 1.5);
  EXPECT_EQ(ParseCpuMax("max 100000\n"), std::nullopt);  // no limit
  EXPECT_EQ(ParseCpuMax(""), std::nullopt);
  EXPECT_EQ(ParseCpuMax("lots"), std::nullopt);
  EXPECT_EQ(ParseCpuMax("0 100000"), std::nullopt);
  EXPECT_EQ(ParseCpuMax("100000 0"), std::nullopt);
}

TEST(CpusTest, ParsesCgroupV1Quota) {
  EXPECT_EQ(ParseCfsQuota("50000\n", "100000\n"), 0.5);
  EXPECT_EQ(ParseCfsQuota("-1\n", "100000\n"), std::nullopt);  // no limit
  EXPECT_EQ(ParseCfsQuota("x", "100000"), std::nullopt);
}

class CgroupDir {
 public:
  CgroupDir()
      : path_(fs::temp_directory_path() /
              ("cpus_test_" + std::to_string(::getpid()) + "_" +
               std::to_string(next_++))) {
    fs::remove_all(path_);
    fs::create_directories(path_ / "cpu");
  }
  ~CgroupDir() { fs::remove_all(path_); }
  void Write(const std::string& name, const std::string& text) const {
    fs::create_directories((path_ / name).parent_path());
    std::ofstream(path_ / name) << text;
  }
  // AvailableCpus on this tree, with `self` as /proc/self/cgroup.
  CpuCount Count(const std::string& self = "0::/\n") const {
    Write("self_cgroup", self);
    return AvailableCpus(path(), (path_ / "self_cgroup").string());
  }
  std::string path() const { return path_.string(); }

 private:
  static inline int next_ = 0;
  fs::path path_;
};

TEST(CpusTest, QuotaLowersTheAffinityCountRoundingUp) {
  const CpuCount plain =
      AvailableCpus("/nonexistent/cgroup", "/nonexistent/self_cgroup");
  EXPECT_GE(plain.affinity, 1);
  EXPECT_EQ(plain.cpus, plain.affinity);
  EXPECT_FALSE(plain.quota.has_value());

  CgroupDir dir;
  dir.Write("cpu.max", "50000 100000\n");  // half a CPU: still 1
  CpuCount half = dir.Count();
  EXPECT_EQ(half.quota, 0.5);
  EXPECT_EQ(half.cpus, 1);

  dir.Write("cpu.max", "max 100000\n");
  EXPECT_EQ(dir.Count().cpus, plain.affinity);

  // A quota above the affinity mask does not raise it.
  dir.Write("cpu.max", "100000000 100000\n");
  EXPECT_EQ(dir.Count().cpus, plain.affinity);
  EXPECT_NE(dir.Count().Describe().find("cgroup quota 1000"),
            std::string::npos);
}

TEST(CpusTest, ReadsCgroupV1WhenThereIsNoCpuMax) {
  CgroupDir dir;
  dir.Write("cpu/cpu.cfs_quota_us", "100000\n");
  dir.Write("cpu/cpu.cfs_period_us", "100000\n");
  const CpuCount one = dir.Count("1:cpu,cpuacct:/\n0::/\n");
  EXPECT_EQ(one.quota, 1.0);
  EXPECT_EQ(one.cpus, 1);
  EXPECT_EQ(one.Describe(), "1 CPU (affinity " +
                                std::to_string(one.affinity) +
                                ", cgroup quota 1)");
}

// Without a cgroup namespace the files of this process's own cgroup are
// below the root, and a parent's limit applies to its children.
TEST(CpusTest, WalksThisProcessCgroupPathAndTakesTheSmallestQuota) {
  CgroupDir dir;
  dir.Write("cpu.max", "max 100000\n");
  dir.Write("kubepods/pod1/cpu.max", "150000 100000\n");
  dir.Write("kubepods/pod1/ctr/cpu.max", "max 100000\n");
  const CpuCount v2 = dir.Count("0::/kubepods/pod1/ctr\n");
  EXPECT_EQ(v2.quota, 1.5);
  EXPECT_EQ(v2.cpus, std::min(2, v2.affinity));  // 1.5 CPUs plan for 2
  // The same tree seen from outside that cgroup: no limit.
  EXPECT_FALSE(dir.Count("0::/\n").quota.has_value());

  CgroupDir v1_dir;
  v1_dir.Write("cpu/cpu.cfs_quota_us", "-1\n");
  v1_dir.Write("cpu/cpu.cfs_period_us", "100000\n");
  v1_dir.Write("cpu/docker/abc/cpu.cfs_quota_us", "100000\n");
  v1_dir.Write("cpu/docker/abc/cpu.cfs_period_us", "100000\n");
  const CpuCount v1 =
      v1_dir.Count("4:memory:/other\n3:cpu,cpuacct:/docker/abc\n0::/\n");
  EXPECT_EQ(v1.quota, 1.0);
  EXPECT_EQ(v1.cpus, 1);
}

}  // namespace
}  // namespace vdm
