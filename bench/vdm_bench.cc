// vdm-bench: a bounded load generator for vdm-server. Runs `--concurrency`
// closed-loop callers with a Sample/ScoreBPD mix for `--requests` calls or
// `--duration_s` seconds (whichever ends first), and prints images/s, network
// evaluations/s, latency percentiles per request kind and errors. In the same
// run it measures the raw forward throughput of the model (`--model`) at the
// engine's batch size and thread count, and prints served / raw.
#include <torch/script.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "model/vdm/omp_env.h"
#include "model/vdm/torchscript_model.h"
#include "bench/load_util.h"
#include "vdm/v1/vdm.grpc.pb.h"

ABSL_FLAG(std::string, target, "localhost:50051", "server address");
ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt",
          "the served model, for the raw forward measurement; empty skips it");
ABSL_FLAG(int, concurrency, 8, "closed-loop callers");
ABSL_FLAG(int, requests, 64, "total calls (bounded)");
ABSL_FLAG(double, duration_s, 120, "stop issuing calls after this long");
ABSL_FLAG(double, score_fraction, 0.5, "share of ScoreBPD calls in the mix");
ABSL_FLAG(int, sample_images, 4, "images per Sample call");
ABSL_FLAG(int, sample_steps, 20, "DDIM steps per Sample call");
ABSL_FLAG(bool, sample_png, false,
          "Sample calls ask for PNG images (else raw bytes)");
ABSL_FLAG(int, guidance_every, 2,
          "every k-th Sample call is guided (label + scale 3); 0 = never");
ABSL_FLAG(int, score_images, 8, "images per ScoreBPD call");
ABSL_FLAG(int, timesteps, 16, "K per ScoreBPD call");
ABSL_FLAG(int, batch, 64, "raw measurement: batch (the server's --max_batch)");
ABSL_FLAG(int, threads, 0, "raw measurement: torch threads (0 = all cores)");
ABSL_FLAG(double, raw_seconds, 10, "raw measurement: seconds of forwards");

namespace {

struct Outcome {
  std::string kind;
  bool ok = false;
  std::string error;
  double seconds = 0;
  int64_t images = 0, evaluations = 0;
};

Outcome CallOnce(vdm::v1::VdmService::Stub& stub, int index, bool score,
                 const std::string& score_pixels) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
  Outcome out;
  const absl::Time start = absl::Now();
  grpc::Status status;
  if (score) {
    out.kind = "ScoreBPD";
    vdm::v1::ScoreRequest r;
    r.set_format(vdm::v1::IMAGE_FORMAT_RAW);
    r.set_timesteps(absl::GetFlag(FLAGS_timesteps));
    r.set_seed(index);
    for (int i = 0; i < absl::GetFlag(FLAGS_score_images); ++i) {
      r.add_images()->set_data(score_pixels);
    }
    vdm::v1::ScoreResponse resp;
    status = stub.ScoreBPD(&context, r, &resp);
    out.images = resp.scores_size();
    out.evaluations = resp.network_evaluations();
  } else {
    out.kind = "Sample";
    vdm::v1::SampleRequest r;
    r.set_num_images(absl::GetFlag(FLAGS_sample_images));
    r.set_steps(absl::GetFlag(FLAGS_sample_steps));
    r.set_seed(index);
    r.set_format(absl::GetFlag(FLAGS_sample_png) ? vdm::v1::IMAGE_FORMAT_PNG
                                                 : vdm::v1::IMAGE_FORMAT_RAW);
    const int every = absl::GetFlag(FLAGS_guidance_every);
    if (every > 0 && index % every == 0) {
      r.set_label(index % 10);
      r.set_guidance_scale(3.0f);
      out.kind = "Sample(guided)";
    }
    vdm::v1::SampleResponse resp;
    status = stub.Sample(&context, r, &resp);
    out.images = resp.images_size();
    out.evaluations = resp.network_evaluations();
  }
  out.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  out.ok = status.ok();
  if (!status.ok()) out.error = status.error_message();
  return out;
}

// Rows per second of plain forwards at the engine's batch size.
double RawForwardRowsPerSecond(const std::string& path) {
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  auto model = vdm::TorchScriptModel::Load({path});
  if (!model.ok()) {
    std::fprintf(stderr, "vdm-bench: %s\n",
                 std::string(model.status().message()).c_str());
    return 0;
  }
  const vdm::ImageShape s = (*model)->shape();
  const int b = absl::GetFlag(FLAGS_batch);
  torch::NoGradGuard no_grad;
  const at::Tensor z = torch::randn({b, s.channels, s.height, s.width});
  const at::Tensor gamma = torch::rand({b}) * 18 - 13;
  const at::Tensor label = torch::randint(0, (*model)->num_classes() + 1, {b},
                                          torch::kLong);
  for (int i = 0; i < 2; ++i) (void)(*model)->Denoise(z, gamma, label);  // warm
  const absl::Time start = absl::Now();
  int64_t rows = 0;
  while (absl::Now() - start < absl::Seconds(absl::GetFlag(FLAGS_raw_seconds))) {
    (void)(*model)->Denoise(z, gamma, label);
    rows += b;
  }
  return rows / absl::ToDoubleSeconds(absl::Now() - start);
}

}  // namespace

int main(int argc, char** argv) {
  // The raw forward pass as vdm-server runs it: its thread pools and malloc.
  vdm::PrepareThreadPools(argv);
  vdm::KeepLargeAllocationsInHeap();
  absl::SetProgramUsageMessage(
      "Bounded load generator for vdm-server; prints served throughput, "
      "latency percentiles and served/raw forward throughput.");
  absl::ParseCommandLine(argc, argv);
  // The raw measurement runs first, on an idle server, so the two do not
  // compete for the cores.
  const std::string model = absl::GetFlag(FLAGS_model);
  const double raw = model.empty() ? 0 : RawForwardRowsPerSecond(model);
  if (raw > 0) {
    std::printf("raw forward rows/s (batch %d): %.1f\n",
                absl::GetFlag(FLAGS_batch), raw);
  }
  auto stub = vdm::bench::Connect(absl::GetFlag(FLAGS_target), "vdm-bench");
  if (stub == nullptr) return 1;
  std::string pixels(28 * 28, '\0');
  for (size_t i = 0; i < pixels.size(); ++i) pixels[i] = static_cast<char>(i * 7);

  const int total = absl::GetFlag(FLAGS_requests);
  const absl::Time stop_at =
      absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_duration_s));
  const double score_fraction = absl::GetFlag(FLAGS_score_fraction);
  std::atomic<int> next{0};
  std::mutex mu;
  std::vector<Outcome> outcomes;
  const absl::Time start = absl::Now();
  std::vector<std::thread> callers;
  for (int c = 0; c < absl::GetFlag(FLAGS_concurrency); ++c) {
    callers.emplace_back([&] {
      for (int i = next++; i < total && absl::Now() < stop_at; i = next++) {
        // Deterministic mix: call i is a score when its slot says so.
        const bool score = std::fmod(i * score_fraction, 1.0) + score_fraction >= 1.0;
        Outcome o = CallOnce(*stub, i, score, pixels);
        std::lock_guard<std::mutex> lock(mu);
        outcomes.push_back(std::move(o));
      }
    });
  }
  for (auto& t : callers) t.join();
  const double wall = absl::ToDoubleSeconds(absl::Now() - start);

  std::map<std::string, std::vector<double>> latency;
  int64_t images = 0, evaluations = 0, errors = 0;
  std::map<std::string, int> error_kinds;
  for (const Outcome& o : outcomes) {
    if (!o.ok) {
      ++errors;
      ++error_kinds[o.error];
      continue;
    }
    latency[o.kind].push_back(o.seconds);
    images += o.images;
    evaluations += o.evaluations;
  }
  std::printf("calls: %zu in %.1f s, errors: %lld\n", outcomes.size(), wall,
              static_cast<long long>(errors));
  for (const auto& [error, n] : error_kinds) std::printf("  error x%d: %s\n", n, error.c_str());
  std::printf("images/s: %.2f\nnetwork evaluations/s (served): %.1f\n",
              images / wall, evaluations / wall);
  std::printf("%-16s %6s %9s %9s %9s %9s\n", "kind", "calls", "p50 s", "p90 s",
              "p99 s", "max s");
  for (const auto& [kind, v] : latency) {
    std::printf("%-16s %6zu %9.3f %9.3f %9.3f %9.3f\n", kind.c_str(), v.size(),
                vdm::bench::Percentile(v, 0.5), vdm::bench::Percentile(v, 0.9), vdm::bench::Percentile(v, 0.99),
                vdm::bench::Percentile(v, 1.0));
  }
  if (raw > 0) std::printf("served/raw: %.3f\n", evaluations / wall / raw);
  return errors == 0 ? 0 : 1;
}
