#include "model/vdm/cpus.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace vdm {
namespace {

std::optional<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path);
  if (!in) return std::nullopt;
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::optional<double> Quota(double quota, double period) {
  if (!(quota > 0) || !(period > 0)) return std::nullopt;
  return quota / period;
}

int AffinityCpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

}  // namespace

std::optional<double> ParseCpuMax(const std::string& text) {
  std::vector<absl::string_view> parts =
      absl::StrSplit(absl::StripAsciiWhitespace(text), ' ', absl::SkipEmpty());
  if (parts.size() != 2 || parts[0] == "max") return std::nullopt;
  double quota = 0, period = 0;
  if (!absl::SimpleAtod(parts[0], &quota) ||
      !absl::SimpleAtod(parts[1], &period)) {
    return std::nullopt;
  }
  return Quota(quota, period);
}

std::optional<double> ParseCfsQuota(const std::string& quota_us,
                                    const std::string& period_us) {
  double quota = 0, period = 0;
  if (!absl::SimpleAtod(absl::StripAsciiWhitespace(quota_us), &quota) ||
      !absl::SimpleAtod(absl::StripAsciiWhitespace(period_us), &period)) {
    return std::nullopt;
  }
  return Quota(quota, period);  // v1 writes -1 for "no limit"
}

CpuCount AvailableCpus(const std::string& cgroup_root) {
  CpuCount count;
  count.affinity = AffinityCpus();
  if (std::optional<std::string> v2 = ReadFile(cgroup_root + "/cpu.max")) {
    count.quota = ParseCpuMax(*v2);
  } else {
    std::optional<std::string> q = ReadFile(cgroup_root + "/cpu/cpu.cfs_quota_us");
    std::optional<std::string> p =
        ReadFile(cgroup_root + "/cpu/cpu.cfs_period_us");
    if (q && p) count.quota = ParseCfsQuota(*q, *p);
  }
  count.cpus = count.affinity;
  if (count.quota) {
    count.cpus = std::min(
        count.cpus, std::max(1, static_cast<int>(std::ceil(*count.quota - 1e-9))));
  }
  count.cpus = std::max(1, count.cpus);
  return count;
}

std::string CpuCount::Describe() const {
  std::string quota_text = "none";
  if (quota) quota_text = absl::StrCat(*quota);
  return absl::StrCat(cpus, cpus == 1 ? " CPU" : " CPUs", " (affinity ",
                      affinity, ", cgroup quota ", quota_text, ")");
}

}  // namespace vdm
