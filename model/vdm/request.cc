#include "model/vdm/request.h"

namespace vdm {

bool IsGuided(const Conditioning& c, int num_classes) {
  return num_classes > 0 && ((c.label >= 0 && c.guidance_scale != 1.0) ||
                             c.negative_label >= 0);
}

int RowsPerImage(const Conditioning& c, int num_classes) {
  return IsGuided(c, num_classes) ? 2 : 1;
}

int64_t RowLabel(const Conditioning& c, int num_classes) {
  return (num_classes > 0 && c.label >= 0) ? c.label : num_classes;
}

int64_t SecondRowLabel(const Conditioning& c, int num_classes) {
  return (num_classes > 0 && c.negative_label >= 0) ? c.negative_label
                                                    : num_classes;
}

int64_t SampleRowCost(const SamplerConfig& sampler, int64_t num_images,
                      const Conditioning& c, int num_classes) {
  return SamplerEvaluations(sampler) * num_images * RowsPerImage(c, num_classes);
}

int64_t ScoreRowCost(int64_t num_images, int timesteps) {
  return num_images * timesteps;
}

int64_t EncodeRowCost(int64_t num_images, int steps) {
  return num_images * steps;
}

int64_t OdeFunctionEvaluations(int steps) {
  return int64_t{kOdeStages} * steps;
}

int64_t OdeRowCost(int64_t num_images, int steps, int trace_samples) {
  return num_images * trace_samples * OdeFunctionEvaluations(steps);
}

uint64_t ChunkSeed(uint64_t base, int64_t chunk) {
  // Golden-ratio stride: distinct, well spread seeds for every chunk.
  return base + static_cast<uint64_t>(chunk) * 0x9E3779B97F4A7C15ull;
}

}  // namespace vdm
