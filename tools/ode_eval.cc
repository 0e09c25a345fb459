// vdm-ode-eval: the probability-flow ODE BPD (model/vdm/ode_likelihood.h)
// against the ELBO BPD (likelihood.h) of the same test images, and each
// solver setting against a reference solve with the same draws (the same
// seed gives the same dequantization and probes whatever the solver), with
// the cost of each (docs/likelihood.md). Images are scored in chunks
// through the library, as the server does (ChunkSeed per chunk); each chunk
// runs the ELBO, every --ode setting and the reference interleaved, so the
// timings share the machine's conditions.
//
//   --ode=dp,dp:1e-4:1e-4,rk4:32,dp/uniform   settings (solver[:args][/deq])
//   --reference=rk4:1024                     the reference of every setting
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
ABSL_FLAG(std::string, ode, "dp",
          "comma-separated solver settings: dp[:RTOL[:ATOL[:MAX_EVALS]]] or "
          "rk4:STEPS, each optionally /gaussian (default), /uniform or "
          "/centres");
ABSL_FLAG(std::string, reference, "",
          "a setting to compare every --ode setting with, image by image "
          "(same draws); empty = none");
ABSL_FLAG(int, trace_samples, 1, "solves per image");
ABSL_FLAG(int, timesteps, 16, "ELBO K");
ABSL_FLAG(uint64_t, seed, 1, "base seed (ChunkSeed per chunk)");
ABSL_FLAG(int, threads, 0, "torch threads (0 = all cores)");
ABSL_FLAG(double, max_seconds, 0, "stop after the chunk that passes this");

namespace {

struct Acc {
  std::vector<double> bpd, diff;  // per image; diff = this - ELBO
  std::vector<double> ref_diff;   // this - the reference
  std::vector<double> error_estimate;  // the solver's, per image
  double seconds = 0;
  double nfe = 0;  // per image, summed
  std::vector<double> se;
};

struct Setting {
  std::string name;
  vdm::OdeOptions options;
};

bool ParseSetting(absl::string_view text, int trace_samples, Setting* out) {
  out->name = std::string(text);
  vdm::OdeOptions& o = out->options;
  o.trace_samples = trace_samples;
  std::vector<std::string> deq = absl::StrSplit(text, '/');
  if (deq.size() > 2) return false;
  if (deq.size() == 2) {
    if (deq[1] == "uniform") {
      o.dequantization = vdm::Dequantization::kUniform;
    } else if (deq[1] == "centres") {
      o.dequantization = vdm::Dequantization::kBinCentres;
    } else if (deq[1] != "gaussian") {
      return false;
    }
  }
  std::vector<std::string> parts = absl::StrSplit(deq[0], ':');
  if (parts[0] == "rk4") {
    o.solver = vdm::OdeSolver::kRk4;
    return parts.size() == 2 && absl::SimpleAtoi(parts[1], &o.steps);
  }
  if (parts[0] != "dp" || parts.size() > 4) return false;
  o.solver = vdm::OdeSolver::kDormandPrince;
  if (parts.size() > 1 && !absl::SimpleAtod(parts[1], &o.rtol)) return false;
  if (parts.size() > 2 && !absl::SimpleAtod(parts[2], &o.atol)) return false;
  if (parts.size() > 3 && !absl::SimpleAtoi(parts[3], &o.max_evaluations)) {
    return false;
  }
  return vdm::CheckOdeOptions(o).ok();
}

void MeanSe(const std::vector<double>& v, double* m, double* se) {
  const double n = static_cast<double>(v.size());
  double s = 0, s2 = 0;
  for (double x : v) s += x;
  *m = s / n;
  for (double x : v) s2 += (x - *m) * (x - *m);
  *se = n > 1 ? std::sqrt(s2 / (n - 1) / n) : NAN;
}

void Summary(const std::string& name, const Acc& a) {
  const double n = static_cast<double>(a.bpd.size());
  if (n < 1) return;
  double m, se;
  MeanSe(a.bpd, &m, &se);
  std::string extra;
  if (!a.diff.empty()) {
    double dm, dse;
    MeanSe(a.diff, &dm, &dse);
    extra += absl::StrFormat("  minus ELBO %+.4f +- %.4f", dm, dse);
  }
  if (!a.ref_diff.empty()) {
    double rm, rse, abs_sum = 0, abs_max = 0, est = 0;
    MeanSe(a.ref_diff, &rm, &rse);
    int covered = 0;
    for (size_t i = 0; i < a.ref_diff.size(); ++i) {
      const double e = std::abs(a.ref_diff[i]);
      abs_sum += e;
      abs_max = std::max(abs_max, e);
      if (i < a.error_estimate.size()) {
        est += a.error_estimate[i];
        covered += e <= a.error_estimate[i];
      }
    }
    extra += absl::StrFormat(
        "  minus reference %+.4f (mean |.| %.4f, max %.4f)", rm,
        abs_sum / a.ref_diff.size(), abs_max);
    if (!a.error_estimate.empty()) {
      extra += absl::StrFormat(
          "  error estimate mean %.4f, >= |error| on %d/%d", est / n, covered,
          static_cast<int>(a.error_estimate.size()));
    }
  }
  double mse = 0;
  for (double s : a.se) mse += s;
  const std::string per_image_se =
      a.se.empty() ? std::string("-") : absl::StrFormat("%.4f", mse / a.se.size());
  std::printf("%-22s n=%lld bpd %.4f +- %.4f%s  NFE/image %.1f  "
              "seconds/image %.3f  mean per-image se %s\n",
              name.c_str(), static_cast<long long>(a.bpd.size()), m, se,
              extra.c_str(), a.nfe / n, a.seconds / n, per_image_se.c_str());
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
  const int trace_samples = absl::GetFlag(FLAGS_trace_samples);
  std::vector<Setting> settings;
  for (absl::string_view t : absl::StrSplit(absl::GetFlag(FLAGS_ode), ',')) {
    Setting setting;
    if (!ParseSetting(t, trace_samples, &setting)) {
      std::fprintf(stderr, "--ode: bad setting '%s'\n", std::string(t).c_str());
      return 1;
    }
    settings.push_back(setting);
  }
  // The reference, once per dequantization the settings use.
  std::vector<Setting> references;
  std::vector<int> reference_of(settings.size(), -1);
  if (!absl::GetFlag(FLAGS_reference).empty()) {
    Setting base;
    if (!ParseSetting(absl::GetFlag(FLAGS_reference), trace_samples, &base)) {
      std::fprintf(stderr, "--reference: bad setting\n");
      return 1;
    }
    for (size_t k = 0; k < settings.size(); ++k) {
      const vdm::Dequantization deq = settings[k].options.dequantization;
      for (size_t r = 0; r < references.size(); ++r) {
        if (references[r].options.dequantization == deq) reference_of[k] = r;
      }
      if (reference_of[k] < 0) {
        Setting ref = base;
        ref.options.dequantization = deq;
        ref.name = "reference " + base.name;
        if (deq == vdm::Dequantization::kUniform) ref.name += "/uniform";
        if (deq == vdm::Dequantization::kBinCentres) ref.name += "/centres";
        reference_of[k] = references.size();
        references.push_back(ref);
      }
    }
  }
  torch::NoGradGuard no_grad;  // DenoiseVjp turns gradients on for itself
  const int64_t n = static_cast<int64_t>(images->size());
  const int64_t chunk = absl::GetFlag(FLAGS_chunk);
  const vdm::ImageShape shape = (*model)->shape();
  Acc elbo;
  std::vector<Acc> ode(settings.size()), ref(references.size());
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
    elbo.nfe += static_cast<double>(so.likelihood.times) * m;
    for (int64_t i = 0; i < m; ++i) {
      elbo.bpd.push_back(e->bpd[i].item<double>());
      elbo.se.push_back(e->stderr_bpd[i].item<double>());
    }
    const at::Tensor label =
        at::full({m}, int64_t{(*model)->num_classes()}, at::kLong);
    // Runs `setting` on the chunk into `acc`; the per-image BPDs in `bpd`.
    auto run = [&](const Setting& setting, Acc& acc,
                   std::vector<double>* bpd) -> bool {
      const absl::Time start_time = absl::Now();
      auto s = vdm::OdeLikelihood(**model, *x, label, setting.options,
                                  at::make_generator<at::CPUGeneratorImpl>(seed),
                                  128);
      if (!s.ok()) {
        std::fprintf(stderr, "ode %s: %s\n", setting.name.c_str(),
                     std::string(s.status().message()).c_str());
        return false;
      }
      acc.seconds += absl::ToDoubleSeconds(absl::Now() - start_time);
      acc.nfe += static_cast<double>(s->total_evaluations);
      for (int64_t i = 0; i < m; ++i) {
        const double b = s->bpd[i].item<double>();
        bpd->push_back(b);
        acc.bpd.push_back(b);
        acc.diff.push_back(b - e->bpd[i].item<double>());
        const double se = s->stderr_bpd[i].item<double>();
        if (!std::isnan(se)) acc.se.push_back(se);
        const double est = s->solver_error_bpd[i].item<double>();
        if (!std::isnan(est)) acc.error_estimate.push_back(est);
      }
      return true;
    };
    std::vector<std::vector<double>> ref_bpd(references.size());
    for (size_t r = 0; r < references.size(); ++r) {
      if (!run(references[r], ref[r], &ref_bpd[r])) return 1;
    }
    for (size_t k = 0; k < settings.size(); ++k) {
      std::vector<double> bpd;
      if (!run(settings[k], ode[k], &bpd)) return 1;
      if (reference_of[k] >= 0) {
        for (int64_t i = 0; i < m; ++i) {
          ode[k].ref_diff.push_back(bpd[i] - ref_bpd[reference_of[k]][i]);
        }
      }
    }
    std::printf("chunk %lld done (%lld images, %.0f s)\n", static_cast<long long>(c),
                static_cast<long long>(start + m),
                absl::ToDoubleSeconds(absl::Now() - begin));
    Summary("elbo", elbo);
    for (size_t r = 0; r < references.size(); ++r) {
      Summary(references[r].name, ref[r]);
    }
    for (size_t k = 0; k < settings.size(); ++k) {
      Summary("ode " + settings[k].name, ode[k]);
    }
    std::fflush(stdout);
    const double max_s = absl::GetFlag(FLAGS_max_seconds);
    if (max_s > 0 && absl::ToDoubleSeconds(absl::Now() - begin) > max_s) break;
  }
  return 0;
}
