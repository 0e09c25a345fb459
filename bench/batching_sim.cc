// vdm-batching-sim: continuous (step-level) batching against request-level
// dynamic batching (as Triton's dynamic batcher does it) and no batching, on
// the real engine and tasks with a simulated network cost per forward pass
// of a + b * rows (bench/batching_sim.h). Deterministic: a seeded Poisson
// trace, the same for every policy, and a fake clock.
//
//   vdm-batching-sim                      # both cost models, ~1 minute
//   vdm-batching-sim --preset=gpu --csv=out.csv
//   vdm-batching-sim --preset=custom --a_ms=2 --b_ms=0.1
//
// Prints markdown tables (docs/performance.md, "Continuous batching against
// request-level batching"); the last line is
// `continuous/request-level throughput: R`, the ratio of the highest loads
// the two policies sustain within the latency objective, on the last cost
// model run (GPU-like by default).
#include "bench/batching_sim.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"

ABSL_FLAG(std::string, preset, "both",
          "cost model: gpu (a = 4 ms, b = 0.02 ms/row), cpu (a = 0.5 ms, "
          "b = 10 ms/row), both (cpu, then gpu), or custom (--a_ms, --b_ms)");
ABSL_FLAG(double, a_ms, 4.0, "fixed cost per forward pass (--preset=custom)");
ABSL_FLAG(double, b_ms, 0.02, "cost per row (--preset=custom)");
ABSL_FLAG(int, requests, 300, "requests per simulated run");
ABSL_FLAG(uint64_t, seed, 1, "seed of the arrival trace");
ABSL_FLAG(int, max_batch, 64, "rows per forward pass (every policy)");
ABSL_FLAG(double, batch_window_ms, 5.0,
          "request-level batching: how long a batch stays open after its "
          "first request arrived");
ABSL_FLAG(double, ddpm_share, 0.2,
          "share of DDPM-250 requests in the main sweep");
ABSL_FLAG(std::string, csv, "", "write latency per load and policy here");
ABSL_FLAG(bool, sweeps, true, "also the DDPM-250 share and max_batch sweeps");

namespace vdm {
namespace {

constexpr int kKinds = 4;
const char* const kKindNames[kKinds] = {"DDIM-10", "DDIM-50", "DDPM-250",
                                        "BPD-K16"};

struct Policy {
  const char* name;
  Admission admission;
};
const Policy kPolicies[] = {
    {"one-at-a-time", Admission::kOneAtATime},
    {"request-level", Admission::kRequestLevel},
    {"continuous", Admission::kContinuous},
};

// The mix: DDIM-10 30 %, BPD-K16 20 %, DDPM-250 `ddpm_share`, DDIM-50 the
// rest; 1-4 images; half the samples guided (2 rows per image).
// Arrivals are unit-rate Poisson times divided by `rate`, so every load and
// policy sees the same requests in the same order.
std::vector<SimRequest> MakeTrace(int n, double rate, double ddpm_share,
                                  uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<SimRequest> trace;
  double t = 0;
  for (int i = 0; i < n; ++i) {
    t += -std::log(1.0 - u(rng));
    const double k = u(rng);
    const int images = 1 + static_cast<int>(u(rng) * 4) % 4;
    const bool guided = u(rng) < 0.5;
    const int label = static_cast<int>(u(rng) * 10) % 10;
    SimRequest r;
    r.arrival = absl::Seconds(t / rate);
    r.kind = k < 0.3 ? 0 : k < 0.5 ? 3 : k < 0.5 + ddpm_share ? 2 : 1;
    if (r.kind == 3) {
      r.is_score = true;
      for (int j = 0; j < images; ++j) {
        r.score.images.push_back(
            {1, 8, 8, std::vector<uint8_t>(64, static_cast<uint8_t>(40 * j))});
      }
      r.score.timesteps = 16;
      r.score.seed = i;
    } else {
      r.sample.num_images = images;
      r.sample.sampler.type =
          r.kind == 2 ? SamplerType::kDdpm : SamplerType::kDdim;
      r.sample.sampler.steps = r.kind == 0 ? 10 : r.kind == 1 ? 50 : 250;
      r.sample.conditioning.label = guided ? label : -1;
      r.sample.conditioning.guidance_scale = guided ? 3.0 : 1.0;
      r.sample.seed = i;
    }
    trace.push_back(std::move(r));
  }
  return trace;
}

int64_t Rows(const SimRequest& r) {
  if (r.is_score) return r.images() * r.score.timesteps;
  const int per = r.sample.conditioning.label >= 0 ? 2 : 1;
  return r.images() * per * r.sample.sampler.steps;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t i = static_cast<size_t>(std::ceil(p * v.size()));
  return v[std::min(v.size() - 1, i == 0 ? 0 : i - 1)];
}

struct Stats {
  double load = 0;  // offered, requests/s
  double images_per_s = 0, rows_per_s = 0, busy = 0, mean_batch = 0;
  double p[kKinds][3] = {};  // p50, p90, p99 in seconds
};

Stats Measure(const std::vector<SimRequest>& trace, const SimOutcome& out,
              double load) {
  Stats s;
  s.load = load;
  const double end = absl::ToDoubleSeconds(out.end);
  int64_t images = 0;
  std::vector<double> lat[kKinds];
  for (size_t i = 0; i < trace.size(); ++i) {
    images += trace[i].images();
    lat[trace[i].kind].push_back(absl::ToDoubleSeconds(out.latency[i]));
  }
  s.images_per_s = images / end;
  s.rows_per_s = out.rows / end;
  s.busy = absl::ToDoubleSeconds(out.busy) / end;
  s.mean_batch = static_cast<double>(out.rows) / out.batches.size();
  for (int k = 0; k < kKinds; ++k) {
    s.p[k][0] = Percentile(lat[k], 0.5);
    s.p[k][1] = Percentile(lat[k], 0.9);
    s.p[k][2] = Percentile(lat[k], 0.99);
  }
  return s;
}

Stats RunOne(Admission admission, int max_batch, const CostModel& cost,
             const std::vector<SimRequest>& trace, double load) {
  Engine::Options options;
  options.max_batch = max_batch;
  SimPolicy policy;
  policy.admission = admission;
  policy.batch_window =
      absl::Milliseconds(absl::GetFlag(FLAGS_batch_window_ms));
  absl::StatusOr<SimOutcome> out = Simulate(options, policy, cost, trace);
  if (!out.ok()) {
    std::fprintf(stderr, "simulation failed: %s\n",
                 out.status().ToString().c_str());
    std::exit(1);
  }
  return Measure(trace, *out, load);
}

// Within the objective: every kind's p99 at most its limit.
bool Meets(const Stats& s, const double slo[kKinds]) {
  for (int k = 0; k < kKinds; ++k) {
    if (!(s.p[k][2] <= slo[k])) return false;
  }
  return true;
}

std::string Ms(double seconds) {
  const double ms = seconds * 1e3;
  if (ms >= 1e4) return absl::StrFormat("%.0fk", ms / 1e3);
  if (ms >= 100) return absl::StrFormat("%.0f", ms);
  return absl::StrFormat("%.1f", ms);
}

std::string Load(double x) {
  return x >= 10  ? absl::StrFormat("%.0f", x)
         : x >= 1 ? absl::StrFormat("%.1f", x)
                  : absl::StrFormat("%.3g", x);
}

struct ModelReport {
  std::string text;  // markdown
  std::string csv;   // rows of the CSV
  double r = 0;      // continuous / request-level sustained load
};

// What the parts of one cost model's report share: the flags, the trace's
// rows per request, the full-batch rate and the latency objective.
struct ModelRun {
  std::string name;
  CostModel cost;
  int n = 0;  // requests per run
  uint64_t seed = 0;
  int max_batch = 0;
  double share = 0;  // of DDPM-250 requests
  double a = 0, b = 0;  // the cost model, in seconds
  double mean_rows = 0;
  double c64 = 0;  // Capacity(max_batch)
  double slo[kKinds] = {};  // p99 limit per kind, seconds

  // Requests/s at which full batches of `batch` rows keep the device busy.
  double Capacity(int batch) const {
    return batch / (a + b * batch) / mean_rows;
  }
};

ModelRun SetUpRun(const std::string& name, const CostModel& cost) {
  ModelRun m;
  m.name = name;
  m.cost = cost;
  m.n = absl::GetFlag(FLAGS_requests);
  m.seed = absl::GetFlag(FLAGS_seed);
  m.max_batch = absl::GetFlag(FLAGS_max_batch);
  m.share = absl::GetFlag(FLAGS_ddpm_share);
  m.a = absl::ToDoubleSeconds(cost.fixed);
  m.b = absl::ToDoubleSeconds(cost.per_row);
  const std::vector<SimRequest> unit = MakeTrace(m.n, 1.0, m.share, m.seed);
  for (const SimRequest& r : unit) m.mean_rows += Rows(r);
  m.mean_rows /= m.n;
  m.c64 = m.Capacity(m.max_batch);
  return m;
}

// The continuous engine (kPolicies' last), for the objective and the
// max_batch sweep.
Stats RunContinuous(int max_batch, const CostModel& cost,
                    const std::vector<SimRequest>& trace, double load) {
  return RunOne(kPolicies[2].admission, max_batch, cost, trace, load);
}

// The section's title and the mix it runs.
void AppendHeader(const ModelRun& m, std::string* o) {
  absl::StrAppendFormat(
      o, "\n## %s cost model: a = %g ms per pass, b = %g ms per row\n\n",
      m.name.c_str(), m.a * 1e3, m.b * 1e3);
  absl::StrAppendFormat(
      o,
      "%d requests per run (seed %llu): DDIM-10 30%%, DDIM-50 %.0f%%, "
      "DDPM-250 %.0f%%, ScoreBPD K=16 20%%; 1-4 images, half the "
      "samples guided; %.0f rows per request on average. max_batch "
      "%d, request-level window %g ms. Full batches serve %.3g "
      "requests/s.\n\n",
      m.n, static_cast<unsigned long long>(m.seed), (0.5 - m.share) * 100,
      m.share * 100, m.mean_rows, m.max_batch,
      absl::GetFlag(FLAGS_batch_window_ms), m.c64);
}

// The objective: 10x each kind's p99 when every request is served alone
// by the continuous engine (arrivals 10^6 s apart). Sets m->slo.
void SetObjective(ModelRun* m, std::string* o) {
  std::vector<SimRequest> alone = MakeTrace(m->n, 1.0, m->share, m->seed);
  for (size_t i = 0; i < alone.size(); ++i) {
    alone[i].arrival = absl::Seconds(1e6 * static_cast<double>(i));
  }
  const Stats solo = RunContinuous(m->max_batch, m->cost, alone, 0);
  absl::StrAppendFormat(
      o,
      "Latency objective (p99, each kind): 10x its p99 when served "
      "alone by the continuous engine:");
  for (int k = 0; k < kKinds; ++k) {
    m->slo[k] = 10 * solo.p[k][2];
    absl::StrAppendFormat(o, " %s %s ms%s", kKindNames[k],
                          Ms(m->slo[k]).c_str(),
                          k + 1 < kKinds ? "," : ".\n\n");
  }
}

// One row of the load table (markdown) and of the CSV.
void AppendLoadRow(const ModelRun& m, const Policy& policy, double load,
                   const Stats& s, bool ok, ModelReport* report) {
  std::string& o = report->text;
  absl::StrAppendFormat(&o, "| %s | %s | %.3g | %.3g | %.2f | %.1f |",
                        policy.name, Load(load).c_str(), s.images_per_s,
                        s.rows_per_s, s.busy, s.mean_batch);
  for (int k = 0; k < kKinds; ++k) {
    absl::StrAppendFormat(&o, " %s/%s/%s |", Ms(s.p[k][0]).c_str(),
                          Ms(s.p[k][1]).c_str(), Ms(s.p[k][2]).c_str());
  }
  absl::StrAppendFormat(&o, " %s |\n", ok ? "yes" : "no");
  absl::StrAppendFormat(&report->csv, "%s,%s,%g,%g,%g,%g", m.name, policy.name,
                        load, s.images_per_s, s.rows_per_s, s.busy);
  for (int k = 0; k < kKinds; ++k) {
    absl::StrAppendFormat(&report->csv, ",%g,%g,%g,%g", s.p[k][0], s.p[k][1],
                          s.p[k][2], m.slo[k]);
  }
  absl::StrAppendFormat(&report->csv, "\n");
}

// The loads of the main sweep, as fractions of the full-batch rate.
constexpr double kLoadFractions[] = {0.0005, 0.001, 0.002, 0.005, 0.01,
                                     0.02,   0.05,  0.1,   0.2,   0.4,
                                     0.6,    0.7,   0.8,   0.9,   1.0};

// The main sweep of one policy, up to two loads past the objective; returns
// the highest load within it (this and every lower load).
double SweepLoads(const ModelRun& m, const Policy& policy,
                  ModelReport* report) {
  double sustained = 0;
  bool failing = false;
  int over = 0;  // loads past the objective so far
  for (double f : kLoadFractions) {
    const double load = f * m.c64;
    const std::vector<SimRequest> trace = MakeTrace(m.n, load, m.share, m.seed);
    const Stats s = RunOne(policy.admission, m.max_batch, m.cost, trace, load);
    const bool ok = Meets(s, m.slo);
    if (ok && !failing) sustained = load;
    if (!ok) failing = true, ++over;
    AppendLoadRow(m, policy, load, s, ok, report);
    if (over >= 2) break;  // the rest only grows
  }
  return sustained;
}

// The load table of every policy, then the highest load each sustains;
// sets sustained[policy].
void AppendLoadTable(const ModelRun& m, ModelReport* report,
                     double sustained[3]) {
  std::string& o = report->text;
  absl::StrAppendFormat(
      &o,
      "| policy | offered req/s | images/s | rows/s | busy | mean "
      "batch |");
  for (int k = 0; k < kKinds; ++k) {
    absl::StrAppendFormat(&o, " %s p50/p90/p99 ms |", kKindNames[k]);
  }
  absl::StrAppendFormat(&o, " within |\n|---|---|---|---|---|---|");
  for (int k = 0; k < kKinds; ++k) absl::StrAppendFormat(&o, "---|");
  absl::StrAppendFormat(&o, "---|\n");
  for (int pi = 0; pi < 3; ++pi) {
    sustained[pi] = SweepLoads(m, kPolicies[pi], report);
  }
  absl::StrAppendFormat(
      &o,
      "\nHighest load within the objective (this and every lower "
      "load of the sweep):");
  for (int pi = 0; pi < 3; ++pi) {
    absl::StrAppendFormat(&o, " %s %s req/s%s", kPolicies[pi].name,
                          Load(sustained[pi]).c_str(), pi < 2 ? "," : ".\n");
  }
}

// What each policy delivers when overloaded (offered 2x the full-batch
// rate), whatever the latency.
void AppendPeak(const ModelRun& m, std::string* o) {
  const double load = 2 * m.c64;
  const std::vector<SimRequest> trace = MakeTrace(m.n, load, m.share, m.seed);
  absl::StrAppendFormat(o, "Peak throughput (offered %s req/s):", Load(load));
  for (int pi = 0; pi < 3; ++pi) {
    const Stats s =
        RunOne(kPolicies[pi].admission, m.max_batch, m.cost, trace, load);
    absl::StrAppendFormat(o,
                          " %s %.3g images/s (%.3g rows/s, mean batch "
                          "%.1f rows)%s",
                          kPolicies[pi].name, s.images_per_s, s.rows_per_s,
                          s.mean_batch, pi < 2 ? "," : ".\n");
  }
}

// DDIM-10 latency against the share of DDPM-250 traffic, at a fixed
// request rate (a quarter of the default mix's full-batch rate).
void AppendShareSweep(const ModelRun& m, std::string* o) {
  const double load = 0.25 * m.c64;
  absl::StrAppendFormat(
      o,
      "\nDDIM-10 latency against the DDPM-250 share (DDIM-50 makes "
      "up the rest), at %s req/s:\n\n| DDPM-250 share |",
      Load(load).c_str());
  for (int pi = 1; pi < 3; ++pi) {
    absl::StrAppendFormat(o, " %s DDIM-10 p50 / p99 ms |", kPolicies[pi].name);
  }
  absl::StrAppendFormat(o, " continuous mean batch |\n|---|---|---|---|\n");
  for (double s : {0.0, 0.1, 0.25, 0.5}) {
    const std::vector<SimRequest> trace = MakeTrace(m.n, load, s, m.seed);
    absl::StrAppendFormat(o, "| %.0f%% |", s * 100);
    double batch = 0;
    for (int pi = 1; pi < 3; ++pi) {
      const Policy& p = kPolicies[pi];
      const Stats st = RunOne(p.admission, m.max_batch, m.cost, trace, load);
      absl::StrAppendFormat(o, " %s / %s |", Ms(st.p[0][0]).c_str(),
                            Ms(st.p[0][2]).c_str());
      batch = st.mean_batch;
    }
    absl::StrAppendFormat(o, " %.1f |\n", batch);
  }
}

// One row of the max_batch table: the highest load the continuous engine
// sustains with `mb` rows per pass within the objective, its peak rows/s,
// and DDIM-10's and BPD-K16's p50 at half the max_batch-64 rate.
void AppendMaxBatchRow(const ModelRun& m, int mb, std::string* o) {
  auto run = [&](double load) {
    return RunContinuous(mb, m.cost, MakeTrace(m.n, load, m.share, m.seed),
                         load);
  };
  const double c64 = m.c64;
  // Geometric bisection for the highest load within the objective,
  // from [0.01, 4] x the max_batch-64 full-batch rate: 4 steps after
  // the probe at half that rate.
  const Stats half = run(0.5 * c64);
  double best = 0.5 * c64, fail = 4 * c64;
  if (!Meets(half, m.slo)) best = 0.01 * c64, fail = 0.5 * c64;
  for (int i = 0; i < 4; ++i) {
    const double mid = std::sqrt(best * fail);
    (Meets(run(mid), m.slo) ? best : fail) = mid;
  }
  std::string sustained_mb = Load(best);
  if (best == 0.01 * c64 && !Meets(run(best), m.slo)) {
    sustained_mb = "< " + sustained_mb;
  }
  const double peak_load = 3 * m.Capacity(mb);
  const double peak = run(peak_load).rows_per_s;
  absl::StrAppendFormat(o, "| %d | %s | %.3g | %s | %s |\n", mb, sustained_mb,
                        peak, Ms(half.p[0][0]).c_str(),
                        Ms(half.p[3][0]).c_str());
}

// max_batch: the highest load the continuous engine sustains within the
// same objective, and DDIM-10's p50 at half the max_batch-64 rate.
void AppendMaxBatchSweep(const ModelRun& m, std::string* o) {
  const double c64 = m.c64;
  absl::StrAppendFormat(
      o,
      "\nmax_batch (continuous; the objective above, from "
      "max_batch %d; sustained load found by geometric bisection "
      "in [%s, %s] req/s, 4 steps after a probe at half the full-batch "
      "rate: within 14%% above that probe, 28%% below; peak at 3x the "
      "full-batch "
      "rate of that max_batch):\n\n| max_batch | sustained req/s | peak "
      "rows/s | DDIM-10 p50 ms at %s req/s | BPD-K16 p50 ms at %s "
      "req/s |\n|---|---|---|---|---|\n",
      m.max_batch, Load(0.01 * c64), Load(4 * c64), Load(0.5 * c64).c_str(),
      Load(0.5 * c64).c_str());
  for (int mb : {16, 32, 64, 128, 256}) AppendMaxBatchRow(m, mb, o);
}

// Runs the sweeps of one cost model.
ModelReport RunModel(const std::string& name, const CostModel& cost) {
  ModelReport report;
  ModelRun m = SetUpRun(name, cost);
  AppendHeader(m, &report.text);
  SetObjective(&m, &report.text);
  double sustained[3] = {0, 0, 0};
  AppendLoadTable(m, &report, sustained);
  AppendPeak(m, &report.text);
  if (absl::GetFlag(FLAGS_sweeps)) {
    AppendShareSweep(m, &report.text);
    AppendMaxBatchSweep(m, &report.text);
  }
  report.r = sustained[1] > 0 ? sustained[2] / sustained[1] : INFINITY;
  absl::StrAppendFormat(&report.text,
                        "\n%s: continuous/request-level sustained load: "
                        "%.3g\n",
                        name, report.r);
  return report;
}

}  // namespace
}  // namespace vdm

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Continuous batching against request-level batching and no batching, "
      "on the real engine with a simulated a + b * rows network cost");
  absl::ParseCommandLine(argc, argv);
  const std::string preset = absl::GetFlag(FLAGS_preset);
  std::vector<std::pair<std::string, vdm::CostModel>> models;
  const vdm::CostModel cpu{absl::Microseconds(500), absl::Milliseconds(10)};
  const vdm::CostModel gpu{absl::Milliseconds(4), absl::Microseconds(20)};
  if (preset == "cpu" || preset == "both") models.emplace_back("CPU-like", cpu);
  if (preset == "gpu" || preset == "both") models.emplace_back("GPU-like", gpu);
  if (preset == "custom") {
    models.emplace_back(
        "custom",
        vdm::CostModel{absl::Microseconds(1e3 * absl::GetFlag(FLAGS_a_ms)),
                       absl::Microseconds(1e3 * absl::GetFlag(FLAGS_b_ms))});
  }
  if (models.empty()) {
    std::fprintf(stderr, "--preset must be gpu, cpu, both or custom\n");
    return 2;
  }
  FILE* csv = nullptr;
  const std::string csv_path = absl::GetFlag(FLAGS_csv);
  if (!csv_path.empty()) {
    csv = std::fopen(csv_path.c_str(), "w");
    if (csv == nullptr) {
      std::fprintf(stderr, "cannot write %s\n", csv_path.c_str());
      return 1;
    }
    std::fprintf(csv, "model,policy,load,images_per_s,rows_per_s,busy");
    for (const char* k : {"ddim10", "ddim50", "ddpm250", "bpd16"}) {
      std::fprintf(csv, ",%s_p50,%s_p90,%s_p99,%s_slo", k, k, k, k);
    }
    std::fprintf(csv, "\n");
  }
  // One thread per cost model: each simulation has its own engine and clock.
  std::vector<vdm::ModelReport> reports(models.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < models.size(); ++i) {
    threads.emplace_back([&, i] {
      reports[i] = vdm::RunModel(models[i].first, models[i].second);
    });
  }
  for (std::thread& t : threads) t.join();
  double r = 0;
  for (const vdm::ModelReport& report : reports) {
    std::fputs(report.text.c_str(), stdout);
    if (csv) std::fputs(report.csv.c_str(), csv);
    r = report.r;
  }
  if (csv) std::fclose(csv);
  std::printf("continuous/request-level throughput: %s\n",
              absl::StrFormat("%.4g", r).c_str());
  return 0;
}
