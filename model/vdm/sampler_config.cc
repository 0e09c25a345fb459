#include "model/vdm/sampler_config.h"

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace vdm {
namespace {

// The one table of samplers (see the header): name, evaluations per step,
// multistep, takes eta.
constexpr SamplerTraits kSamplers[] = {
    {SamplerType::kDdim, "ddim", 1, false, true},
    {SamplerType::kDdpm, "ddpm", 1, false, false},
    {SamplerType::kEulerMaruyama, "euler_maruyama", 1, false, false},
    {SamplerType::kHeun, "heun", 2, false, false},
    {SamplerType::kDpmSolver2M, "dpm_solver_2m", 1, true, false},
};

struct GridEntry {
  TimeGrid grid;
  const char* name;
};

constexpr GridEntry kGrids[] = {
    {TimeGrid::kUniformT, "uniform_t"},
    {TimeGrid::kUniformLogSnr, "uniform_log_snr"},
};

}  // namespace

const SamplerTraits& TraitsOf(SamplerType type) {
  for (const SamplerTraits& e : kSamplers) {
    if (e.type == type) return e;
  }
  return kSamplers[0];  // unreachable: every enumerator is in the table
}

const std::vector<SamplerType>& AllSamplerTypes() {
  static const auto* all = [] {
    auto* v = new std::vector<SamplerType>;
    for (const SamplerTraits& e : kSamplers) v->push_back(e.type);
    return v;
  }();
  return *all;
}

const std::vector<TimeGrid>& AllTimeGrids() {
  static const auto* all = [] {
    auto* v = new std::vector<TimeGrid>;
    for (const GridEntry& e : kGrids) v->push_back(e.grid);
    return v;
  }();
  return *all;
}

std::string SamplerName(SamplerType type) { return TraitsOf(type).name; }

absl::StatusOr<SamplerType> ParseSamplerType(const std::string& name) {
  const std::string lower = absl::AsciiStrToLower(name);
  for (const SamplerTraits& e : kSamplers) {
    if (lower == e.name) return e.type;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown sampler \"", name, "\" (want ", SamplerNameList(", "), ")"));
}

std::string TimeGridName(TimeGrid grid) {
  for (const GridEntry& e : kGrids) {
    if (e.grid == grid) return e.name;
  }
  return kGrids[0].name;
}

absl::StatusOr<TimeGrid> ParseTimeGrid(const std::string& name) {
  const std::string lower = absl::AsciiStrToLower(name);
  for (const GridEntry& e : kGrids) {
    if (lower == e.name) return e.grid;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown time grid \"", name, "\" (want ", TimeGridNameList(", "), ")"));
}

std::string SamplerNameList(const std::string& separator) {
  return SamplerNameList(separator, [](const SamplerTraits&) { return true; });
}

std::string SamplerNameList(const std::string& separator,
                            bool (*keep)(const SamplerTraits&)) {
  std::vector<std::string> names;
  for (const SamplerTraits& e : kSamplers) {
    if (keep(e)) names.push_back(e.name);
  }
  return absl::StrJoin(names, separator);
}

std::string TimeGridNameList(const std::string& separator) {
  std::vector<std::string> names;
  for (const GridEntry& e : kGrids) names.push_back(e.name);
  return absl::StrJoin(names, separator);
}

int64_t SamplerEvaluations(const SamplerConfig& config) {
  return int64_t{TraitsOf(config.type).evaluations_per_step} * config.steps *
         (1 + int64_t{config.resample_rounds});
}

}  // namespace vdm
