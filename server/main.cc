// vdm-server: serves a TorchScript VDM over gRPC. See README.md.
#include <pthread.h>

#include <csignal>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "server/server.h"

ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt",
          "TorchScript model (.pt) to serve");
ABSL_FLAG(std::string, address, "0.0.0.0:50051", "gRPC listen address");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9090",
          "Prometheus /metrics listen address; empty disables it");
ABSL_FLAG(std::string, devices, "cpu",
          "comma-separated torch devices, one worker each: cpu or "
          "cuda:0,cuda:1,...");
ABSL_FLAG(int, threads, 0, "torch intra-op threads; 0 = all cores");
ABSL_FLAG(int, max_batch, 64, "rows per forward pass");
ABSL_FLAG(int64_t, max_queued_rows, 200000,
          "admitted but unfinished rows per worker before RESOURCE_EXHAUSTED");
ABSL_FLAG(bool, score_priority, false,
          "give ScoreBPD rows precedence over Sample rows in each batch");
ABSL_FLAG(int, max_images_per_request, 64,
          "largest num_images (Sample) or images (ScoreBPD) per request");
ABSL_FLAG(int, max_steps, 1000, "largest Sample steps");
ABSL_FLAG(int, max_timesteps, 256, "largest ScoreBPD timesteps (K)");
ABSL_FLAG(int, max_message_mb, 64, "largest gRPC message, MiB");
ABSL_FLAG(std::string, tls_cert, "", "PEM server certificate (enables TLS)");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM CA that client certificates must chain to (enables mTLS)");
ABSL_FLAG(std::string, auth_token_file, "",
          "file with the bearer token VdmService calls must carry "
          "(health and reflection stay open)");
ABSL_FLAG(int, drain_seconds, 20,
          "on SIGTERM/SIGINT: seconds in-flight calls get to finish");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Serves a TorchScript Variational Diffusion Model over gRPC.\n"
      "  vdm-server --model=PATH.pt --address=HOST:PORT "
      "--metrics_address=HOST:PORT --threads=N");
  absl::ParseCommandLine(argc, argv);

  vdm::VdmServer::Options options;
  options.model_path = absl::GetFlag(FLAGS_model);
  options.address = absl::GetFlag(FLAGS_address);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  options.devices = absl::StrSplit(absl::GetFlag(FLAGS_devices), ',',
                                   absl::SkipWhitespace());
  options.threads = absl::GetFlag(FLAGS_threads);
  options.engine.max_batch = absl::GetFlag(FLAGS_max_batch);
  options.engine.max_queued_rows = absl::GetFlag(FLAGS_max_queued_rows);
  options.engine.score_priority = absl::GetFlag(FLAGS_score_priority);
  options.limits.max_images_per_request =
      absl::GetFlag(FLAGS_max_images_per_request);
  options.limits.max_steps = absl::GetFlag(FLAGS_max_steps);
  options.limits.max_timesteps = absl::GetFlag(FLAGS_max_timesteps);
  options.limits.max_batch = options.engine.max_batch;
  options.max_message_mb = absl::GetFlag(FLAGS_max_message_mb);
  options.tls_cert_file = absl::GetFlag(FLAGS_tls_cert);
  options.tls_key_file = absl::GetFlag(FLAGS_tls_key);
  options.tls_client_ca_file = absl::GetFlag(FLAGS_tls_client_ca);
  options.auth_token_file = absl::GetFlag(FLAGS_auth_token_file);

  if (absl::GetFlag(FLAGS_drain_seconds) < 0) {
    std::fprintf(stderr, "vdm-server: --drain_seconds: %d must be >= 0\n",
                 absl::GetFlag(FLAGS_drain_seconds));
    return 1;
  }
  if (absl::Status valid = vdm::ValidateOptions(options); !valid.ok()) {
    std::fprintf(stderr, "vdm-server: %s\n",
                 std::string(valid.message()).c_str());
    return 1;
  }

  // SIGTERM/SIGINT are blocked in every thread and taken by sigwait below,
  // so shutdown runs in ordinary code rather than in a signal handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const absl::Time start = absl::Now();
  auto server = vdm::VdmServer::Create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "vdm-server: %s\n",
                 std::string(server.status().message()).c_str());
    return 1;
  }
  std::fprintf(stderr,
               "vdm-server: serving %s on port %d (metrics port %d), "
               "ready in %.1f s\n",
               options.model_path.c_str(), (*server)->port(),
               (*server)->metrics_port(),
               absl::ToDoubleSeconds(absl::Now() - start));
  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "vdm-server: signal %d, draining (up to %d s)\n",
               signal_number, absl::GetFlag(FLAGS_drain_seconds));
  (*server)->Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)));
  (*server)->Wait();
  // Where the time went (docs/performance.md, "Worker busy fraction").
  const double wall = absl::ToDoubleSeconds(absl::Now() - start);
  const std::vector<vdm::WorkerStats> stats = (*server)->engine().worker_stats();
  for (size_t i = 0; i < stats.size(); ++i) {
    const vdm::WorkerStats& w = stats[i];
    std::fprintf(stderr,
                 "vdm-server: worker %zu: %lld batches, %lld rows, forward "
                 "%.2f s, host %.2f s of %.1f s up\n",
                 i, static_cast<long long>(w.batches),
                 static_cast<long long>(w.rows), w.forward_seconds,
                 w.host_seconds, wall);
  }
  std::fprintf(stderr, "vdm-server: completion thread: %.2f s\n",
               (*server)->engine().completion_seconds());
  std::fprintf(stderr, "vdm-server: stopped\n");
  return 0;
}
