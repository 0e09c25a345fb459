// What a request asks of the library, free of torch: what it is conditioned
// on, what it costs and how its seeds are laid out. The one place that says
// when classifier-free guidance applies (and so how many network rows an
// image needs per evaluation) and how many rows a Sample or ScoreBPD request
// costs in total. The engine uses the costs for admission control; the
// samplers use the rule to pair rows (samplers.h).
#ifndef VDM_MODEL_VDM_REQUEST_H_
#define VDM_MODEL_VDM_REQUEST_H_

#include <cstdint>

#include "absl/status/status.h"

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

// How the probability-flow ODE likelihood (ode_likelihood.h) is computed.
// Every image gets `trace_samples` independent solves (trajectories), each
// with its own dequantization draw and its own fixed Hutchinson probe.
enum class OdeSolver {
  // Dormand-Prince 5(4), adaptive per trajectory with rtol / atol (the
  // default): 6 network evaluations per attempted step (first same as last),
  // plus 1 at the start.
  kDormandPrince,
  // Classical RK4 on `steps` steps uniform in gamma: 4 evaluations per step.
  kRk4,
};

enum class Dequantization {
  // The VDM's own q(z_0 | x) = N(alpha_0 f(x), sigma_0^2) with its discrete
  // decoder p(x | z_0): a variational bound on -log P(x) (the default).
  kGaussian,
  // y = x + u, u ~ U[0, 1)^D: the ODE density of the dequantized pixels.
  kUniform,
  // y = x + 1/2, no noise: a density at the bin centres, not a bound.
  kBinCentres,
};

enum class TraceProbe {
  kRademacher,  // v_i = +-1: the lowest variance; exact for diagonal J
  kGaussian,    // v ~ N(0, I)
};

// Defaults chosen by measurement against a 1,000-step RK4 reference
// (docs/likelihood.md, "Converged by default").
inline constexpr double kDefaultOdeRtol = 1e-5;
inline constexpr double kDefaultOdeAtol = 1e-5;
inline constexpr int kDefaultOdeMaxEvaluations = 3000;
inline constexpr double kMinOdeTolerance = 1e-7;
inline constexpr double kMaxOdeTolerance = 0.1;
inline constexpr int kMaxOdeEvaluations = 4000;
// The first evaluation and two Dormand-Prince steps.
inline constexpr int kMinOdeEvaluations = 13;
inline constexpr int kDefaultOdeSteps = 32;  // OdeOptions::steps (kRk4) in the library
inline constexpr int kMaxOdeSteps = 1000;
inline constexpr int kMaxTraceSamples = 64;
inline constexpr int kRk4Stages = 4;

struct OdeOptions {
  OdeSolver solver = OdeSolver::kDormandPrince;
  double rtol = kDefaultOdeRtol;   // kDormandPrince
  double atol = kDefaultOdeAtol;   // kDormandPrince
  // kDormandPrince: evaluations per trajectory at most; a trajectory that
  // reaches it takes the rest of the interval in one step, whose error its
  // error estimate then shows.
  int max_evaluations = kDefaultOdeMaxEvaluations;
  int steps = kDefaultOdeSteps;    // kRk4
  int trace_samples = 1;           // trajectories per image, >= 1
  TraceProbe probe = TraceProbe::kRademacher;
  Dequantization dequantization = Dequantization::kGaussian;
};

// Network evaluations (each a forward and a vector-Jacobian product) per
// trajectory: exactly 4 x steps for kRk4, at most max_evaluations for
// kDormandPrince.
int64_t OdeMaxEvaluations(const OdeOptions& options);
// OK, or InvalidArgument naming the field out of range (trace_samples,
// ode_steps for kRk4, ode_rtol, ode_atol, ode_max_evaluations).
absl::Status CheckOdeOptions(const OdeOptions& options);
// Network rows an ODE ScoreBPD request of n images costs at most.
int64_t OdeRowCost(int64_t num_images, const OdeOptions& options);

// The seed of chunk `chunk` of a dataset scored in chunks whose chunk 0 uses
// `base` (the client's chunked ScoreBPD and the trainer's evaluation):
// ChunkSeed(base, 0) == base.
uint64_t ChunkSeed(uint64_t base, int64_t chunk);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_REQUEST_H_
