// How the programs that run torch start its OpenMP threads. Torch-free.
#ifndef VDM_MODEL_VDM_OMP_ENV_H_
#define VDM_MODEL_VDM_OMP_ENV_H_

#include <unistd.h>

#include <cstdlib>

namespace vdm {

// Debian's libtorch runs its intra-op threads on OpenMP (libgomp), whose
// threads spin while they wait; on cores shared with other work 2 threads
// then run several times slower than 1 (docs/performance.md, "Precision and
// threads"). Unless OMP_WAIT_POLICY is set already, sets it to PASSIVE and
// re-executes the program with the same arguments (libgomp reads it once, at
// load), so call it first thing in main: the process keeps its pid. Returns
// when the variable was set before (or the exec failed).
inline void PreferPassiveOmpWait(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "PASSIVE", 1);
  execv("/proc/self/exe", argv);  // returns only on failure
}

}  // namespace vdm

#endif  // VDM_MODEL_VDM_OMP_ENV_H_
