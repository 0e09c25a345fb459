// How the programs that run torch set up their process: its OpenMP threads
// and malloc. Torch-free.
#ifndef VDM_MODEL_VDM_OMP_ENV_H_
#define VDM_MODEL_VDM_OMP_ENV_H_

#include <malloc.h>
#include <unistd.h>

#include <cstdlib>

namespace vdm {

// The thread pools torch's libraries start at load, set before they load:
// - Debian's libtorch runs its intra-op threads on OpenMP (libgomp), whose
//   threads spin while they wait; on cores shared with other work 2 threads
//   then run several times slower than 1 (docs/performance.md, "Precision
//   and threads"): OMP_WAIT_POLICY=PASSIVE.
// - OpenBLAS (the linear layers) runs its own pool of one thread per core;
//   two workers' forward passes calling it at once contend for it (26,000
//   context switches in 4 s, a lone guided request 1.7x slower split across
//   two workers; docs/performance.md, "Serving speed"): the torch threads
//   are the parallelism, so OPENBLAS_NUM_THREADS=1.
// Each is set only when unset (an operator's value wins). When either was
// set here, re-executes the program with the same arguments (both are read
// once, at load), so call it first thing in main: the process keeps its
// pid. Returns when both were set before (or the exec failed).
inline void PrepareThreadPools(char** argv) {
  struct Default {
    const char* name;
    const char* value;
  };
  bool changed = false;
  for (const Default& d : {Default{"OMP_WAIT_POLICY", "PASSIVE"},
                           Default{"OPENBLAS_NUM_THREADS", "1"}}) {
    if (std::getenv(d.name) != nullptr) continue;
    setenv(d.name, d.value, 1);
    changed = true;
  }
  if (changed) execv("/proc/self/exe", argv);  // returns only on failure
}

// Large tensors (a forward pass's activations: 3 MB each at 16 rows of the
// shipped model, the trainer's [B, D, 256] logits: ~50 MB at batch 64) are
// otherwise mmap'ed and unmapped at every operator, and the page faults cost
// more than the maths: the trainer's tiny model trained 2x faster without
// them; two server workers, each forwarding its own batch, lost 30% of their
// speed to faults serialised on the process's one memory map
// (docs/performance.md, "Serving speed"). Keeps freed memory
// in malloc's heap instead (the server's engine still hands it back with
// malloc_trim at most once a second). Returns false when glibc refuses.
inline bool KeepLargeAllocationsInHeap() {
  return mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 &&
         mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1 &&
         mallopt(M_TOP_PAD, 256 << 20) == 1;
}

}  // namespace vdm

#endif  // VDM_MODEL_VDM_OMP_ENV_H_
