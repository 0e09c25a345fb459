// vdm-ode-eval: the probability-flow ODE BPD (model/vdm/ode_likelihood.h)
// against the ELBO BPD (likelihood.h) of the same test images, with the
// cost of each (docs/likelihood.md). Images are scored in chunks through
// the library, as the server does (ChunkSeed per chunk); each chunk runs
// every --ode_steps value and the ELBO interleaved, so the timings share
// the machine's conditions.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/script.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "model/vdm/image_io.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/ode_likelihood.h"
#include "model/vdm/request.h"
#include "model/vdm/tensor_image.h"
#include "model/vdm/torchscript_model.h"

ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt", "the .pt model");
ABSL_FLAG(std::string, idx, "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
          "IDX images to score");
ABSL_FLAG(int64_t, limit, 64, "score the first N images");
ABSL_FLAG(int64_t, chunk, 64, "images per chunk (one plan)");
ABSL_FLAG(std::string, ode_steps, "32", "comma-separated RK4 step counts");
ABSL_FLAG(int, trace_samples, 1, "Hutchinson probes per image");
ABSL_FLAG(int, timesteps, 16, "ELBO K");
ABSL_FLAG(uint64_t, seed, 1, "base seed (ChunkSeed per chunk)");
ABSL_FLAG(int, threads, 0, "torch threads (0 = all cores)");
ABSL_FLAG(double, max_seconds, 0, "stop after the chunk that passes this");

namespace {

struct Acc {
  std::vector<double> bpd, diff;  // per image; diff = this - ELBO
  double seconds = 0;
  int64_t nfe = 0;
  std::vector<double> se;
};

void Summary(const char* name, const Acc& a) {
  const double n = static_cast<double>(a.bpd.size());
  if (n < 1) return;
  auto mean_se = [n](const std::vector<double>& v, double* m, double* se) {
    double s = 0, s2 = 0;
    for (double x : v) s += x;
    *m = s / n;
    for (double x : v) s2 += (x - *m) * (x - *m);
    *se = n > 1 ? std::sqrt(s2 / (n - 1) / n) : NAN;
  };
  double m, se, dm = NAN, dse = NAN;
  mean_se(a.bpd, &m, &se);
  if (!a.diff.empty()) mean_se(a.diff, &dm, &dse);
  double mse = 0;
  for (double s : a.se) mse += s;
  // The paired difference only for the ODE rows; the ELBO row has none.
  const std::string paired =
      a.diff.empty() ? std::string()
                     : absl::StrFormat("  minus ELBO %+.4f +- %.4f", dm, dse);
  const std::string per_image_se =
      a.se.empty() ? std::string("-") : absl::StrFormat("%.4f", mse / a.se.size());
  std::printf("%-14s n=%lld bpd %.4f +- %.4f%s  NFE/image %lld  "
              "seconds/image %.3f  mean per-image se %s\n",
              name, static_cast<long long>(a.bpd.size()), m, se,
              paired.c_str(), static_cast<long long>(a.nfe), a.seconds / n,
              per_image_se.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  auto model = vdm::TorchScriptModel::Load({absl::GetFlag(FLAGS_model)});
  if (!model.ok()) {
    std::fprintf(stderr, "%s\n", std::string(model.status().message()).c_str());
    return 1;
  }
  auto images = vdm::ReadIdxImages(absl::GetFlag(FLAGS_idx),
                                   absl::GetFlag(FLAGS_limit));
  if (!images.ok()) {
    std::fprintf(stderr, "%s\n", std::string(images.status().message()).c_str());
    return 1;
  }
  std::vector<int> steps;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_ode_steps), ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < 1) {
      std::fprintf(stderr, "--ode_steps: bad value\n");
      return 1;
    }
    steps.push_back(v);
  }
  torch::NoGradGuard no_grad;  // DenoiseVjp turns gradients on for itself
  const int64_t n = static_cast<int64_t>(images->size());
  const int64_t chunk = absl::GetFlag(FLAGS_chunk);
  const vdm::ImageShape shape = (*model)->shape();
  Acc elbo;
  std::vector<Acc> ode(steps.size());
  const absl::Time begin = absl::Now();
  for (int64_t c = 0, start = 0; start < n; ++c, start += chunk) {
    const int64_t m = std::min(chunk, n - start);
    std::vector<vdm::Image8> part(images->begin() + start,
                                  images->begin() + start + m);
    auto x = vdm::ToTensor(part, shape);
    if (!x.ok()) return 1;
    const uint64_t seed = vdm::ChunkSeed(absl::GetFlag(FLAGS_seed), c);
    vdm::ScoreOptions so;
    so.likelihood.times = absl::GetFlag(FLAGS_timesteps);
    so.seed = seed;
    so.batch_rows = 256;
    absl::Time t0 = absl::Now();
    auto e = vdm::ScoreImages(**model, *x, so);
    if (!e.ok()) {
      std::fprintf(stderr, "elbo: %s\n", std::string(e.status().message()).c_str());
      return 1;
    }
    elbo.seconds += absl::ToDoubleSeconds(absl::Now() - t0);
    elbo.nfe = so.likelihood.times;
    for (int64_t i = 0; i < m; ++i) {
      elbo.bpd.push_back(e->bpd[i].item<double>());
      elbo.se.push_back(e->stderr_bpd[i].item<double>());
    }
    const at::Tensor label =
        at::full({m}, int64_t{(*model)->num_classes()}, at::kLong);
    for (size_t k = 0; k < steps.size(); ++k) {
      vdm::OdeOptions oo;
      oo.steps = steps[k];
      oo.trace_samples = absl::GetFlag(FLAGS_trace_samples);
      t0 = absl::Now();
      auto s = vdm::OdeLikelihood(**model, *x, label, oo,
                                  at::make_generator<at::CPUGeneratorImpl>(seed),
                                  128);
      if (!s.ok()) {
        std::fprintf(stderr, "ode: %s\n", std::string(s.status().message()).c_str());
        return 1;
      }
      ode[k].seconds += absl::ToDoubleSeconds(absl::Now() - t0);
      ode[k].nfe = s->function_evaluations * oo.trace_samples;
      for (int64_t i = 0; i < m; ++i) {
        const double b = s->bpd[i].item<double>();
        ode[k].bpd.push_back(b);
        ode[k].diff.push_back(b - e->bpd[i].item<double>());
        const double se = s->stderr_bpd[i].item<double>();
        if (!std::isnan(se)) ode[k].se.push_back(se);
      }
    }
    std::printf("chunk %lld done (%lld images, %.0f s)\n", static_cast<long long>(c),
                static_cast<long long>(start + m),
                absl::ToDoubleSeconds(absl::Now() - begin));
    Summary("elbo", elbo);
    for (size_t k = 0; k < steps.size(); ++k) {
      Summary(("ode steps=" + std::to_string(steps[k])).c_str(), ode[k]);
    }
    std::fflush(stdout);
    const double max_s = absl::GetFlag(FLAGS_max_seconds);
    if (max_s > 0 && absl::ToDoubleSeconds(absl::Now() - begin) > max_s) break;
  }
  return 0;
}
