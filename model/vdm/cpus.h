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
// up: a limit of 1.5 CPUs plans for 2), at least 1. Reads
// <cgroup_root>/cpu.max (cgroup v2) or <cgroup_root>/cpu/cpu.cfs_quota_us and
// cpu.cfs_period_us (v1); a missing or unreadable file means no quota.
CpuCount AvailableCpus(const std::string& cgroup_root = "/sys/fs/cgroup");

// The quota in CPUs of a cgroup v2 cpu.max ("200000 100000" -> 2.0; "max
// 100000" -> none) and of v1's quota and period ("-1" -> none); nullopt
// for no limit or text that is not a positive quota.
std::optional<double> ParseCpuMax(const std::string& text);
std::optional<double> ParseCfsQuota(const std::string& quota_us,
                                    const std::string& period_us);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_CPUS_H_
