// vdm-oracle-report: the VDM maths measured against exact oracles
// (model/vdm/testing/oracle.h). Prints the markdown tables of docs/oracle.md:
// sampler TV distance vs steps, classifier-free guidance, the exact VLB gap
// and the discrete-time VLB, BPD error and standard error vs K, shared vs
// independent noise, and parameterization invariance. Deterministic for a
// given --seed.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/samplers.h"
#include "model/vdm/testing/oracle.h"

ABSL_FLAG(int64_t, images, 2000, "images sampled per TV measurement");
ABSL_FLAG(int, seeds, 200, "seeds per standard-error measurement");
ABSL_FLAG(uint64_t, seed, 1, "base seed");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");

namespace vdm {
namespace {

struct Variant {
  std::string name;
  SamplerType type;
  double eta;
};

const std::vector<Variant>& Variants() {
  static const auto* v = new std::vector<Variant>{
      {"DDIM eta=0", SamplerType::kDdim, 0.0},
      {"DDIM eta=0.5", SamplerType::kDdim, 0.5},
      {"DDPM (DDIM eta=1)", SamplerType::kDdpm, 1.0},
      {"Euler-Maruyama (reverse SDE)", SamplerType::kEulerMaruyama, 0.0},
      {"Heun (probability-flow ODE)", SamplerType::kHeun, 0.0},
      {"DPM-Solver++(2M)", SamplerType::kDpmSolver2M, 0.0}};
  return *v;
}

std::unique_ptr<OracleDenoiser> MakeOracle(OracleOptions o = {}) {
  return std::move(OracleDenoiser::Create(o)).value();
}

void Row(const std::vector<std::string>& cells) {
  std::printf("| %s |\n", absl::StrJoin(cells, " | ").c_str());
}

void Header(const std::vector<std::string>& cells) {
  Row(cells);
  std::printf("|%s\n",
              absl::StrJoin(std::vector<std::string>(cells.size(), "---|"), "")
                  .c_str());
}

at::Tensor Sample(Denoiser& model, SamplerConfig c, int64_t label = -1,
                  double scale = 1.0) {
  SampleOptions o;
  o.sampler = c;
  o.num_images = absl::GetFlag(FLAGS_images);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.conditioning.label = label;
  o.conditioning.guidance_scale = scale;
  return SampleImages(model, o).value();
}

void TvTable(OracleSchedule schedule, TimeGrid grid) {
  OracleOptions o;
  o.schedule = schedule;
  auto oracle = MakeOracle(o);
  const std::vector<int> steps = {5, 10, 15, 20, 25, 50, 100, 200};
  std::vector<std::string> head = {"sampler", "NFE/step"};
  for (int s : steps) head.push_back(absl::StrCat(s));
  Header(head);
  for (const Variant& v : Variants()) {
    std::vector<std::string> row = {
        v.name, absl::StrCat(SamplerEvaluations({v.type, 1, v.eta, grid}))};
    for (int s : steps) {
      const double tv = PixelTvDistance(
          Sample(*oracle, {v.type, s, v.eta, grid}), oracle->PixelPmf(0));
      row.push_back(absl::StrFormat("%.4f", tv));
    }
    Row(row);
  }
}

void GuidanceTable() {
  OracleOptions o;
  o.pmfs = {{0.7, 0.1, 0.1, 0.1}, {0.1, 0.1, 0.1, 0.7}, {0.1, 0.4, 0.4, 0.1}};
  auto oracle = MakeOracle(o);
  const at::Tensor marginal = oracle->PixelPmf(oracle->num_classes());
  Header({"sampler", "scale", "TV to marginal", "TV to class 0",
          "mean P(class 0 given x)", "frequency of value 40"});
  for (SamplerConfig c :
       {SamplerConfig{SamplerType::kDpmSolver2M, 20, 0, TimeGrid::kUniformT},
        SamplerConfig{SamplerType::kDdpm, 100, 1, TimeGrid::kUniformT}}) {
    for (double scale : {0.0, 1.0, 2.0, 3.0, 5.0}) {
      const at::Tensor x = Sample(*oracle, c, 0, scale);
      Row({absl::StrCat(SamplerName(c.type), " ", c.steps),
           absl::StrFormat("%.0f", scale),
           absl::StrFormat("%.4f", PixelTvDistance(x, marginal)),
           absl::StrFormat("%.4f", PixelTvDistance(x, oracle->PixelPmf(0))),
           absl::StrFormat(
               "%.3f",
               oracle->ClassPosterior(x).select(1, 0).mean().item<double>()),
           absl::StrFormat("%.3f",
                           (x == 40).to(at::kDouble).mean().item<double>())});
    }
  }
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const at::Tensor mix = oracle->Sample(absl::GetFlag(FLAGS_images), 3, gen);
  const at::Tensor c0 = oracle->Sample(absl::GetFlag(FLAGS_images), 0, gen);
  std::printf(
      "\nExact samples of the same size: TV %.4f (mixture), %.4f "
      "(class 0); class 0 has P(class 0 given x) = %.3f and value 40 "
      "at 0.700.\n",
      PixelTvDistance(mix, marginal), PixelTvDistance(c0, oracle->PixelPmf(0)),
      oracle->ClassPosterior(c0).select(1, 0).mean().item<double>());
}

void ExactVlbTable() {
  auto oracle = MakeOracle();
  OracleOptions wide_o;
  wide_o.gamma_min = -18.0;
  wide_o.gamma_max = 9.0;
  auto wide = MakeOracle(wide_o);
  const at::Tensor vlb = oracle->ExpectedVlbPerValue(0);
  const at::Tensor ends = oracle->EndpointTermsPerValue();
  const at::Tensor vlb_wide = wide->ExpectedVlbPerValue(0);
  const double ln2 = std::log(2.0);
  Header({"pixel value", "p", "-log2 p (bits)", "E[VLB] (bits)", "gap (bits)",
          "prior + recon (bits)", "gap, gamma in [-18, 9] (bits)"});
  const auto& o = oracle->options();
  for (size_t j = 0; j < o.values.size(); ++j) {
    const double nll = -std::log(o.pmfs[0][j]) / ln2;
    Row({absl::StrCat(o.values[j]), absl::StrFormat("%.1f", o.pmfs[0][j]),
         absl::StrFormat("%.6f", nll),
         absl::StrFormat("%.6f", vlb[j].item<double>() / ln2),
         absl::StrFormat("%.6f", vlb[j].item<double>() / ln2 - nll),
         absl::StrFormat("%.6f", ends[j].item<double>() / ln2),
         absl::StrFormat("%.6f", vlb_wide[j].item<double>() / ln2 - nll)});
  }
}

void DiscreteTable() {
  Header(
      {"schedule", "T = 10", "T = 100", "T = 1000", "continuous", "exact NLL"});
  for (OracleSchedule s : {OracleSchedule::kLinear, OracleSchedule::kWarped}) {
    OracleOptions o;
    o.schedule = s;
    auto oracle = MakeOracle(o);
    const at::Tensor p = at::tensor(o.pmfs[0], at::kDouble);
    auto bpd = [&](int t) {
      const double nats =
          (oracle->ExpectedVlbPerValue(0, t) * p).sum().item<double>();
      return absl::StrFormat("%.5f", nats / std::log(2.0));
    };
    Row({s == OracleSchedule::kLinear ? "linear" : "warped", bpd(10), bpd(100),
         bpd(1000), bpd(0),
         absl::StrFormat("%.5f", -(p * at::log2(p)).sum().item<double>())});
  }
}

// The estimator this library replaced: a single systematic sample
// t_k = (k + u) / K with adjacent strata paired, var = sum (a - b)^2 / K^2.
at::Tensor PairedStrataVariance(const at::Tensor& l) {
  const int64_t n = l.size(0), k = l.size(1), pairs = k / 2;
  const at::Tensor a = l.narrow(1, 0, 2 * pairs).reshape({n, pairs, 2});
  const at::Tensor d = a.select(2, 0) - a.select(2, 1);
  return d.pow(2).sum(1) * (static_cast<double>(k) / (2 * pairs)) /
         static_cast<double>(k * k);
}

// Scores image x (one) under `seeds` seeds with the plan; returns the
// estimates [seeds], reported stderr [seeds], and the paired-strata and
// naive stderrs [seeds] computed from the same rows.
struct Spread {
  at::Tensor bpd, se, paired, naive;
};

Spread OverSeeds(OracleDenoiser& oracle, const at::Tensor& x,
                 LikelihoodOptions lo) {
  const double to_bpd = 1.0 / (oracle.shape().dims() * std::log(2.0));
  std::vector<at::Tensor> bpd, se, paired, naive;
  for (int s = 0; s < absl::GetFlag(FLAGS_seeds); ++s) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(
        absl::GetFlag(FLAGS_seed) * 7919 + s);
    auto plan = LikelihoodPlan::Create(x, at::Tensor(), lo, ScheduleOf(oracle), gen).value();
    const Rows r = plan->RowsAt(0, plan->rows()).value();
    const at::Tensor label = at::zeros({plan->rows()}, at::kLong);
    (void)plan->Consume(0, oracle.Denoise(r.z, r.gamma, label).value());
    const BpdScores b = plan->Result().value();
    const at::Tensor l = plan->row_losses() * to_bpd;
    bpd.push_back(b.bpd);
    se.push_back(b.stderr_bpd);
    paired.push_back(PairedStrataVariance(l).sqrt());
    naive.push_back(l.std(1) / std::sqrt(static_cast<double>(l.size(1))));
  }
  return {at::cat(bpd), at::cat(se), at::cat(paired), at::cat(naive)};
}

double Rms(const at::Tensor& v) {
  return v.pow(2).mean().sqrt().item<double>();
}

void BpdVsKTable(ImageShape shape, const std::vector<int>& ks) {
  OracleOptions o;
  o.shape = shape;
  auto oracle = MakeOracle(o);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(7);
  const at::Tensor x = oracle->Sample(1, 0, gen);
  const double to_bpd = 1.0 / (shape.dims() * std::log(2.0));
  const double nll =
      (oracle->ExactNll(x, at::zeros({1}, at::kLong)) * to_bpd).item<double>();
  const double expected = (oracle->ExpectedVlb(x, 0) * to_bpd).item<double>();
  std::printf(
      "One %dx%d image: exact NLL %.4f bpd, expected VLB %.4f bpd; "
      "%d seeds per row.\n\n",
      shape.height, shape.width, nll, expected, absl::GetFlag(FLAGS_seeds));
  Header({"K", "design", "mean error vs NLL (bpd)", "observed spread (bpd)",
          "reported stderr (RMS)", "reported / observed",
          "paired strata / observed", "naive std/sqrt(K) / observed"});
  for (int k : ks) {
    for (int g : {1, 0}) {
      LikelihoodOptions lo;
      lo.times = k;
      lo.replicates = g;
      const Spread s = OverSeeds(*oracle, x, lo);
      const double spread = s.bpd.std().item<double>();
      const double err = s.bpd.mean().item<double>() - nll;
      const double err_se = spread / std::sqrt(s.bpd.numel());
      Row({absl::StrCat(k),
           g == 1 ? "1 systematic sample"
                  : absl::StrCat(ReplicatesFor(lo), " replicates"),
           absl::StrFormat("%+.4f ± %.4f", err, err_se),
           absl::StrFormat("%.4f", spread),
           g == 1 ? "-" : absl::StrFormat("%.4f", Rms(s.se)),
           g == 1 ? "-" : absl::StrFormat("%.2f", Rms(s.se) / spread),
           g == 1 ? absl::StrFormat("%.2f", Rms(s.paired) / spread) : "-",
           absl::StrFormat("%.2f", Rms(s.naive) / spread)});
    }
  }
}

BpdScores Score(Denoiser& model, const at::Tensor& x, int k, uint64_t seed,
                bool shared) {
  ScoreOptions o;
  o.likelihood.times = k;
  o.likelihood.shared_noise = shared;
  o.seed = seed;
  o.batch_rows = 16384;
  return ScoreImages(model, x, o).value();
}

void SharedNoiseTable() {
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(15);
  const int64_t n = 500;
  const at::Tensor x = oracle->Sample(n, 0, gen);
  const double to_bpd = 1.0 / (16 * std::log(2.0));
  const double truth =
      (oracle->ExpectedVlb(x, 0) * to_bpd).mean().item<double>();
  Header({"K", "noise", "dataset mean error, RMS over 20 seeds (bpd)",
          "worst seed (bpd)", "spread of score(a) - score(b) (bpd)"});
  for (int k : {2, 16}) {
    for (bool shared : {true, false}) {
      std::vector<double> err, diff;
      for (int s = 0; s < 20; ++s) {
        const BpdScores b = Score(*oracle, x, k, 500 + s, shared);
        err.push_back(b.bpd.mean().item<double>() - truth);
        diff.push_back((b.bpd[0] - b.bpd[1]).item<double>());
      }
      const at::Tensor e = at::tensor(err);
      Row({absl::StrCat(k), shared ? "shared" : "independent",
           absl::StrFormat("%.4f", Rms(e)),
           absl::StrFormat("%+.4f", e[e.abs().argmax()].item<double>()),
           absl::StrFormat("%.4f", at::tensor(diff).std().item<double>())});
    }
  }
}

void ParameterizationTable() {
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(16);
  const at::Tensor x = oracle->Sample(64, 0, gen);
  const BpdScores ref = Score(*oracle, x, 64, 17, false);
  const SamplerConfig c{SamplerType::kDdpm, 50, 1, TimeGrid::kUniformT};
  const at::Tensor ref_x = Sample(*oracle, c);
  Header({"prediction", "max |bpd - bpd(eps)|", "max |stderr - stderr(eps)|",
          "DDPM-50 pixels identical to eps's"});
  for (const char* p : {"eps", "v", "x"}) {
    ParameterizedOracle model(oracle.get(), p);
    const BpdScores s = Score(model, x, 64, 17, false);
    const at::Tensor xs = Sample(model, c);
    Row({p,
         absl::StrFormat("%.2g", (s.bpd - ref.bpd).abs().max().item<double>()),
         absl::StrFormat(
             "%.2g",
             (s.stderr_bpd - ref.stderr_bpd).abs().max().item<double>()),
         absl::StrFormat(
             "%.4f%%",
             100 * (xs == ref_x).to(at::kDouble).mean().item<double>())});
  }
}

}  // namespace
}  // namespace vdm

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Prints the oracle report (docs/oracle.md).");
  absl::ParseCommandLine(argc, argv);
  at::set_num_threads(absl::GetFlag(FLAGS_threads));
  using vdm::OracleSchedule;
  using vdm::TimeGrid;
  std::printf(
      "### TV distance vs steps: linear gamma (uniform t = uniform "
      "log-SNR)\n\n");
  vdm::TvTable(OracleSchedule::kLinear, TimeGrid::kUniformT);
  std::printf("\n### TV distance vs steps: warped gamma, uniform t grid\n\n");
  vdm::TvTable(OracleSchedule::kWarped, TimeGrid::kUniformT);
  std::printf(
      "\n### Classifier-free guidance, conditional oracle, label 0\n\n");
  vdm::GuidanceTable();
  std::printf(
      "\n### Expected VLB (quadrature) vs exact NLL per pixel value\n\n");
  vdm::ExactVlbTable();
  std::printf(
      "\n### Discrete-time VLB with T steps (expected bpd, "
      "quadrature)\n\n");
  vdm::DiscreteTable();
  std::printf("\n### BPD and its standard error vs K: 16 pixels\n\n");
  vdm::BpdVsKTable({1, 4, 4}, {2, 4, 16, 64, 256});
  std::printf("\n### BPD and its standard error vs K: 784 pixels\n\n");
  vdm::BpdVsKTable({1, 28, 28}, {4, 16, 64});
  std::printf("\n### Shared vs independent noise (500 images)\n\n");
  vdm::SharedNoiseTable();
  std::printf("\n### Parameterizations (same seeds)\n\n");
  vdm::ParameterizationTable();
  return 0;
}
