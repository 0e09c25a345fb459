// vdm-seeded-results: the seeded results the README promises reproducible
// (sampled images, ELBO scores, ODE scores at accurate settings) of one
// model, printed as one JSON object, together with the ATen kernel set that
// computed them. tests/portability/check_portability.py runs it under each
// ATEN_CPU_CAPABILITY the CPU has and compares the outputs within stated
// tolerances (docs/performance.md, "What a seed reproduces").
//
//   vdm-seeded-results --model=build/tests/models/tiny.pt
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Version.h>
#include <torch/script.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/match.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/ode_likelihood.h"
#include "model/vdm/samplers.h"
#include "model/vdm/torchscript_model.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, model, "", "the TorchScript model (.pt)");
ABSL_FLAG(int, ode_steps, 32,
          "RK4 steps of the ODE scores (0 = no ODE scores)");
ABSL_FLAG(int, trace_samples, 2, "probes per image of the ODE scores");

namespace {

// "AVX2", "AVX512" or "DEFAULT": the line of at::show_config() that says
// which kernels this process dispatches to.
std::string CpuCapability() {
  for (absl::string_view line : absl::StrSplit(at::show_config(), '\n')) {
    line = absl::StripAsciiWhitespace(line);
    if (absl::ConsumePrefix(&line, "- CPU capability usage: ")) {
      return std::string(line);
    }
  }
  return "unknown";
}

std::vector<double> ToVector(const at::Tensor &t) {
  const at::Tensor d = t.to(at::kDouble).contiguous().view({-1});
  return std::vector<double>(d.data_ptr<double>(),
                             d.data_ptr<double>() + d.numel());
}

int Fail(const absl::Status &status) {
  std::fprintf(stderr, "vdm-seeded-results: %s\n", status.ToString().c_str());
  return 1;
}

} // namespace

int main(int argc, char **argv) {
  absl::ParseCommandLine(argc, argv);
  vdm::SetTorchThreads(1);
  vdm::TorchScriptModel::Options load;
  load.path = absl::GetFlag(FLAGS_model);
  auto model = vdm::TorchScriptModel::Load(load);
  if (!model.ok())
    return Fail(model.status());
  nlohmann::json out;
  out["cpu_capability"] = CpuCapability();

  // Sampling: a stochastic sampler (DDPM) and a guided deterministic one,
  // four images each, from fixed seeds.
  const bool conditional = (*model)->num_classes() > 0;
  struct Case {
    const char *name;
    vdm::SamplerConfig sampler;
    double guidance;
  };
  const Case cases[] = {
      {"ddpm_20",
       {vdm::SamplerType::kDdpm, 20, 0, vdm::TimeGrid::kUniformT},
       1},
      {"ddim_10_guided",
       {vdm::SamplerType::kDdim, 10, 0, vdm::TimeGrid::kUniformLogSnr},
       3}};
  for (const Case &c : cases) {
    torch::NoGradGuard no_grad;
    vdm::SampleOptions so;
    so.sampler = c.sampler;
    so.num_images = 4;
    so.seed = 7;
    if (conditional)
      so.conditioning = {3, c.guidance};
    auto images = vdm::SampleImages(**model, so);
    if (!images.ok())
      return Fail(images.status());
    out["samples"][c.name] = ToVector(*images);
  }

  // Scoring: four fixed images (uniform noise from a seed), the ELBO at
  // K = 16 and the ODE at accurate settings (its VJPs need gradients, so no
  // NoGradGuard there).
  const vdm::ImageShape s = (*model)->shape();
  at::Generator pixels = at::make_generator<at::CPUGeneratorImpl>(11);
  const at::Tensor x = at::randint(0, 256, {4, s.channels, s.height, s.width},
                                   pixels, at::kByte);
  vdm::ScoreOptions elbo;
  elbo.likelihood.times = 16;
  elbo.seed = 5;
  auto scores = [&] {
    torch::NoGradGuard no_grad;
    return vdm::ScoreImages(**model, x, elbo);
  }();
  if (!scores.ok())
    return Fail(scores.status());
  out["elbo"]["bpd"] = ToVector(scores->bpd);
  out["elbo"]["stderr_bpd"] = ToVector(scores->stderr_bpd);

  if (absl::GetFlag(FLAGS_ode_steps) > 0) {
    vdm::OdeOptions ode;
    // A fixed grid: the check is of the kernels' rounding, so the solver
    // must not pick its steps from it.
    ode.solver = vdm::OdeSolver::kRk4;
    ode.steps = absl::GetFlag(FLAGS_ode_steps);
    ode.trace_samples = absl::GetFlag(FLAGS_trace_samples);
    const at::Tensor labels =
        at::full({x.size(0)}, (*model)->num_classes(), at::kLong);
    auto ode_scores = vdm::OdeLikelihood(
        **model, x, labels, ode, at::make_generator<at::CPUGeneratorImpl>(5));
    if (!ode_scores.ok())
      return Fail(ode_scores.status());
    out["ode"]["bpd"] = ToVector(ode_scores->bpd);
    out["ode"]["stderr_bpd"] = ToVector(ode_scores->stderr_bpd);
  }
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
