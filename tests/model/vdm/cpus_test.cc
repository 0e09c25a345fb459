#include "model/vdm/cpus.h"

#include <filesystem>
#include <fstream>
#include <string>

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
  CgroupDir() : path_(fs::temp_directory_path() /
                      ("cpus_test_" + std::to_string(::getpid()))) {
    fs::remove_all(path_);
    fs::create_directories(path_ / "cpu");
  }
  ~CgroupDir() { fs::remove_all(path_); }
  void Write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name) << text;
  }
  std::string path() const { return path_.string(); }

 private:
  fs::path path_;
};

TEST(CpusTest, QuotaLowersTheAffinityCountRoundingUp) {
  const CpuCount plain = AvailableCpus("/nonexistent/cgroup");
  EXPECT_GE(plain.affinity, 1);
  EXPECT_EQ(plain.cpus, plain.affinity);
  EXPECT_FALSE(plain.quota.has_value());

  CgroupDir dir;
  dir.Write("cpu.max", "50000 100000\n");  // half a CPU: still 1
  CpuCount half = AvailableCpus(dir.path());
  EXPECT_EQ(half.quota, 0.5);
  EXPECT_EQ(half.cpus, 1);

  dir.Write("cpu.max", "max 100000\n");
  EXPECT_EQ(AvailableCpus(dir.path()).cpus, plain.affinity);

  // A quota above the affinity mask does not raise it.
  dir.Write("cpu.max", "100000000 100000\n");
  EXPECT_EQ(AvailableCpus(dir.path()).cpus, plain.affinity);
  EXPECT_NE(AvailableCpus(dir.path()).Describe().find("cgroup quota 1000"),
            std::string::npos);
}

TEST(CpusTest, ReadsCgroupV1WhenThereIsNoCpuMax) {
  CgroupDir dir;
  dir.Write("cpu/cpu.cfs_quota_us", "100000\n");
  dir.Write("cpu/cpu.cfs_period_us", "100000\n");
  const CpuCount one = AvailableCpus(dir.path());
  EXPECT_EQ(one.quota, 1.0);
  EXPECT_EQ(one.cpus, 1);
  EXPECT_EQ(one.Describe(), "1 CPU (affinity " +
                                std::to_string(one.affinity) +
                                ", cgroup quota 1)");
}

}  // namespace
}  // namespace vdm
