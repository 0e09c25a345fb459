#ifndef VDM_MODEL_VDM_CPUS_H_
#define VDM_MODEL_VDM_CPUS_H_

// How many CPUs this process may really use: in a container the machine's
// core count (std::thread::hardware_concurrency) overstates it, because a
// Kubernetes CPU limit is a cgroup quota and a cpuset is an affinity mask.
// Torch-free (vdm_core).

#include <optional>
#include <string>

namespace vdm {

// What AvailableCpus() found, for the server's start-up line.
struct CpuCount {
  int cpus = 1;          // what to plan for: min(affinity, quota), >= 1
  int affinity = 1;      // CPUs in this thread's affinity mask (or the machine's)
  std::optional<double> quota;  // the cgroup CPU limit in CPUs, if any
  std::string Describe() const;  // e.g. "2 CPUs (affinity 16, cgroup quota 2)"
};

// The affinity mask's CPU count lowered to the cgroup CPU quota (rounded
// up: a limit of 1.5 CPUs plans for 2), at least 1. The quota is the
// smallest along this process's cgroup path (a parent's limit applies too),
// read from `self_cgroup` (/proc/self/cgroup): for cgroup v2 ("0::/path")
// <cgroup_root>/path/cpu.max and each parent's up to <cgroup_root>/cpu.max;
// for v1 (a line whose controllers include "cpu") the same walk over
// <cgroup_root>/cpu/path/cpu.cfs_quota_us and cpu.cfs_period_us. Inside a
// cgroup namespace the path is "/" and the root files are the container's.
// A missing or unreadable file means no quota there.
CpuCount AvailableCpus(const std::string& cgroup_root = "/sys/fs/cgroup",
                       const std::string& self_cgroup = "/proc/self/cgroup");

// The quota in CPUs of a cgroup v2 cpu.max ("200000 100000" -> 2.0; "max
// 100000" -> none) and of v1's quota and period ("-1" -> none); nullopt
// for no limit or text that is not a positive quota.
std::optional<double> ParseCpuMax(const std::string& text);
std::optional<double> ParseCfsQuota(const std::string& quota_us,
                                    const std::string& period_us);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_CPUS_H_
