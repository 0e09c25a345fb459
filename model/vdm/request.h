// What a request asks of the library, free of torch: what it is conditioned
// on, what it costs and how its seeds are laid out. The one place that says
// when classifier-free guidance applies (and so how many network rows an
// image needs per evaluation) and how many rows a Sample or ScoreBPD request
// costs in total. The engine uses the costs for admission control; the
// samplers use the rule to pair rows (samplers.h).
#ifndef VDM_MODEL_VDM_REQUEST_H_
#define VDM_MODEL_VDM_REQUEST_H_

#include <cstdint>

#include "model/vdm/sampler_config.h"

namespace vdm {

// The class a sampling request asks for and how strongly.
struct Conditioning {
  int label = -1;               // -1 = unconditional ("no label")
  double guidance_scale = 1.0;  // used with a label or a negative label
  // Negative-label guidance: the negative label's prediction takes the
  // place of the unconditional one, eps_neg + s (eps_c - eps_neg); without
  // a label, eps_c is the unconditional prediction (steer away from it).
  int negative_label = -1;      // -1 = none
};

// Classifier-free guidance eps_2 + s (eps_1 - eps_2) applies when the model
// is class-conditional and either a label is given with s != 1 or a
// negative label is given: two rows per image, the first labelled
// RowLabel, the second SecondRowLabel. Otherwise one row per image.
bool IsGuided(const Conditioning& c, int num_classes);
int RowsPerImage(const Conditioning& c, int num_classes);

// The label value rows carry for `c` on a model with `num_classes` classes:
// the label, or num_classes ("no label").
int64_t RowLabel(const Conditioning& c, int num_classes);
// The label of the second row of a guided pair: the negative label, or
// "no label".
int64_t SecondRowLabel(const Conditioning& c, int num_classes);

// Network rows a whole request costs.
int64_t SampleRowCost(const SamplerConfig& sampler, int64_t num_images,
                      const Conditioning& c, int num_classes);
int64_t ScoreRowCost(int64_t num_images, int timesteps);
// Encode (DDIM inversion): one row per image per step.
int64_t EncodeRowCost(int64_t num_images, int steps);

// How ScoreBPD scores: the variational bound (likelihood.h) or the exact
// log-density of the dequantized data by the probability-flow ODE
// (ode_likelihood.h).
enum class ScoreMethod { kElbo, kOde };

// The probability-flow ODE is integrated by classical RK4 on a grid uniform
// in gamma: 4 network evaluations (each a forward and a vector-Jacobian
// product) per step, for each of the trace-estimator probes of each image.
inline constexpr int kDefaultOdeSteps = 32;
inline constexpr int kMaxOdeSteps = 1000;
inline constexpr int kMaxTraceSamples = 64;
inline constexpr int kOdeStages = 4;
// Function evaluations (drift evaluations) per image for `steps` RK4 steps.
int64_t OdeFunctionEvaluations(int steps);
// Network rows (each a forward and a VJP) of an ODE ScoreBPD request.
int64_t OdeRowCost(int64_t num_images, int steps, int trace_samples);

// The seed of chunk `chunk` of a dataset scored in chunks whose chunk 0 uses
// `base` (the client's chunked ScoreBPD and the trainer's evaluation):
// ChunkSeed(base, 0) == base.
uint64_t ChunkSeed(uint64_t base, int64_t chunk);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_REQUEST_H_
