// The choice of sampler and time grid, free of torch so that request
// handling (server/, client/, proto/convert.h) can name them without the
// tensor headers. The samplers themselves are in samplers.h.
//
// The names below are the one table of sampler spellings: the CLI flags use
// them as they are, and the proto enums are their upper-case forms with a
// prefix (SAMPLER_DDIM, TIME_GRID_UNIFORM_T), mapped in proto/convert.cc.
#ifndef VDM_MODEL_VDM_SAMPLER_CONFIG_H_
#define VDM_MODEL_VDM_SAMPLER_CONFIG_H_

#include <cstdint>
#include <string>
#include <vector>

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
  // The grid runs from t_start down to 0 (image-to-image starts below 1).
  double t_start = 1.0;
  // RePaint resampling (Lugmayr et al. 2022), inpainting only: after each
  // step t -> s the trajectory jumps back to t through the forward process
  // q(z_t | z_s) and redoes the step, this many times (jump length 1), so
  // every step costs 1 + resample_rounds times its evaluations. The
  // SamplingPlan does it (samplers.h); 0 = none.
  int resample_rounds = 0;
};

// What the table says about one sampler.
struct SamplerTraits {
  SamplerType type;
  const char* name;          // the spelling (see above)
  int evaluations_per_step;  // network evaluations (NFE) per row per step
  // Multistep: a step uses the earlier steps too (a history), so the state
  // cannot jump back (no RePaint resampling). Otherwise memoryless: the
  // next step depends only on z_t.
  bool multistep;
  // The request's eta applies (DDIM); every other sampler refuses an eta
  // other than 0.
  bool takes_eta;
};

// The table's row of `type`.
const SamplerTraits& TraitsOf(SamplerType type);

// Every sampler and time grid, in table order.
const std::vector<SamplerType>& AllSamplerTypes();
const std::vector<TimeGrid>& AllTimeGrids();

// "ddim", "ddpm", "euler_maruyama", "heun", "dpm_solver_2m".
std::string SamplerName(SamplerType type);
// Case-insensitive; the error lists the valid names.
absl::StatusOr<SamplerType> ParseSamplerType(const std::string& name);
// "uniform_t", "uniform_log_snr".
std::string TimeGridName(TimeGrid grid);
absl::StatusOr<TimeGrid> ParseTimeGrid(const std::string& name);
// "ddim|ddpm|..." and "uniform_t|uniform_log_snr", for help texts.
std::string SamplerNameList(const std::string& separator = "|");
// The names of the samplers `keep` accepts, in table order, e.g. the
// memoryless ones: SamplerNameList(", ", [](const SamplerTraits& t) {
// return !t.multistep; }).
std::string SamplerNameList(const std::string& separator,
                            bool (*keep)(const SamplerTraits&));
std::string TimeGridNameList(const std::string& separator = "|");

// Network evaluations per row for the whole trajectory (known before
// starting, for admission control), resampling rounds included; request.h
// says what guidance adds.
int64_t SamplerEvaluations(const SamplerConfig& config);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_SAMPLER_CONFIG_H_
