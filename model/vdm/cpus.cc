#include "model/vdm/cpus.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

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

// The directories from <base><path> up to <base>, deepest first.
std::vector<std::string> UpTo(const std::string& base, std::string path) {
  std::vector<std::string> dirs;
  while (!path.empty() && path != "/") {
    dirs.push_back(base + path);
    const size_t slash = path.rfind('/');
    path = slash == std::string::npos ? "" : path.substr(0, slash);
  }
  dirs.push_back(base);
  return dirs;
}

void Lower(std::optional<double>& quota, std::optional<double> q) {
  if (q && (!quota || *q < *quota)) quota = q;
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

CpuCount AvailableCpus(const std::string& cgroup_root,
                       const std::string& self_cgroup) {
  CpuCount count;
  count.affinity = AffinityCpus();
  // This process's cgroup paths: v2's and v1's cpu controller's ("/" when
  // unknown, i.e. the root files).
  std::string v2_path = "/", v1_path = "/";
  if (std::optional<std::string> text = ReadFile(self_cgroup)) {
    for (absl::string_view line : absl::StrSplit(*text, '\n')) {
      std::vector<absl::string_view> f = absl::StrSplit(line, absl::MaxSplits(':', 2));
      if (f.size() != 3) continue;
      if (f[0] == "0" && f[1].empty()) v2_path = std::string(f[2]);
      for (absl::string_view c : absl::StrSplit(f[1], ',')) {
        if (c == "cpu") v1_path = std::string(f[2]);
      }
    }
  }
  bool v2 = false;
  for (const std::string& dir : UpTo(cgroup_root, v2_path)) {
    if (std::optional<std::string> max = ReadFile(dir + "/cpu.max")) {
      v2 = true;
      Lower(count.quota, ParseCpuMax(*max));
    }
  }
  if (!v2) {
    for (const std::string& dir : UpTo(cgroup_root + "/cpu", v1_path)) {
      std::optional<std::string> q = ReadFile(dir + "/cpu.cfs_quota_us");
      std::optional<std::string> p = ReadFile(dir + "/cpu.cfs_period_us");
      if (q && p) Lower(count.quota, ParseCfsQuota(*q, *p));
    }
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
