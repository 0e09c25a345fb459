// Small pieces the load generators (vdm-bench, vdm-soak) share. Header-only;
// thread-safe (no state).
#ifndef VDM_BENCH_LOAD_UTIL_H_
#define VDM_BENCH_LOAD_UTIL_H_

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "vdm/v1/vdm.grpc.pb.h"

namespace vdm::bench {

// The p-quantile (0..1) of `v` by rank; 0 for an empty sample.
inline double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

// A stub on a plaintext channel to `target`, once it connects (30 s at
// most); null, with a message naming `program`, when it does not.
inline std::unique_ptr<vdm::v1::VdmService::Stub> Connect(
    const std::string& target, const char* program) {
  auto channel = grpc::CreateChannel(target, grpc::InsecureChannelCredentials());
  if (!channel->WaitForConnected(std::chrono::system_clock::now() +
                                 std::chrono::seconds(30))) {
    std::fprintf(stderr, "%s: cannot connect to %s\n", program, target.c_str());
    return nullptr;
  }
  return vdm::v1::VdmService::NewStub(channel);
}

}  // namespace vdm::bench

#endif  // VDM_BENCH_LOAD_UTIL_H_
