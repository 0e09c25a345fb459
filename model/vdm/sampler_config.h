// The choice of sampler and time grid, free of torch so that request
// handling (server/engine.h, server/service.cc) can name them without the
// tensor headers. The samplers themselves are in samplers.h.
#ifndef VDM_MODEL_VDM_SAMPLER_CONFIG_H_
#define VDM_MODEL_VDM_SAMPLER_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace vdm {

enum class SamplerType {
  kDdim,           // DDIM(eta); 1 network evaluation (NFE) per step
  kDdpm,           // ancestral sampling = DDIM(eta = 1); 1 NFE per step
  kEulerMaruyama,  // reverse SDE, Euler-Maruyama in gamma; 1 NFE per step
  kHeun,           // probability-flow ODE, Heun's method; 2 NFE per step
  kDpmSolver2M,    // DPM-Solver++(2M), data prediction; 1 NFE per step
};

enum class TimeGrid {
  kUniformT,       // t_i = 1 - i / N, gamma from the model's schedule
  kUniformLogSnr,  // gamma_i = gamma(1) + (gamma(0) - gamma(1)) i / N
};

struct SamplerConfig {
  SamplerType type = SamplerType::kDdim;
  int steps = 50;    // N >= 1
  double eta = 0.0;  // DDIM only, in [0, 1]
  TimeGrid grid = TimeGrid::kUniformT;
};

// "ddim", "ddpm", "euler_maruyama", "heun", "dpm_solver_2m".
std::string SamplerName(SamplerType type);
absl::StatusOr<SamplerType> ParseSamplerType(const std::string& name);
// "uniform_t", "uniform_log_snr".
std::string TimeGridName(TimeGrid grid);
absl::StatusOr<TimeGrid> ParseTimeGrid(const std::string& name);

// Network evaluations per row for the whole trajectory (known before
// starting, for admission control); a guided request costs twice this.
int64_t SamplerEvaluations(const SamplerConfig& config);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_SAMPLER_CONFIG_H_
