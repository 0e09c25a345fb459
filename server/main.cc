// vdm-server: serves a TorchScript VDM over gRPC. See README.md.
#include <fcntl.h>
#include <malloc.h>
#include <unistd.h>

#include <cerrno>

#include <csignal>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <glog/logging.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "model/vdm/omp_env.h"
#include "server/server.h"

ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt",
          "TorchScript model (.pt) to serve, as a repository of one (model "
          "name: the file's stem, version 1); ignored with "
          "--model_repository");
ABSL_FLAG(std::string, model_repository, "",
          "model repository directory: DIR/NAME/VERSION/model.pt (and "
          "optionally model.pt.calibration.json and background.pt beside "
          "it); each model serves its newest version, and new versions are "
          "swapped in without dropping requests (docs/deploy.md)");
ABSL_FLAG(std::string, default_model, "",
          "with --model_repository: the model of requests that name none; "
          "empty = the first by name");
ABSL_FLAG(int, repository_poll_seconds, 10,
          "with --model_repository: seconds between scans for new, changed "
          "or removed versions (0 = only at start-up and on SIGHUP)");
ABSL_FLAG(int, max_loaded_models, 8,
          "models loaded at once; a model beyond it is listed as failed "
          "until another leaves (a new version of a served model does not "
          "count)");
ABSL_FLAG(std::string, calibration, "",
          "anomaly calibration JSON (vdm-calibrate) of --model; empty = "
          "MODEL.calibration.json when it exists; none = uncalibrated");
ABSL_FLAG(std::string, background_model, "",
          "background model (.pt, vdm-train --mutation_rate) of the same "
          "image shape and classes: ScoreBPD also returns llr = bpd - "
          "background_bpd (Ren et al. 2019), at K more rows per image; "
          "empty = none");
ABSL_FLAG(std::string, feature_model, "",
          "feature network (.pt with features(), model/net/classifier.py) of "
          "--model for ScoreRequest.anomaly_level THOROUGH, with the "
          "calibration's anomaly.thorough section; empty = "
          "MODEL.features.pt when it exists; none = no thorough level");
ABSL_FLAG(std::string, address, "0.0.0.0:50051", "gRPC listen address");
ABSL_FLAG(std::string, metrics_address, "0.0.0.0:9090",
          "Prometheus /metrics listen address; empty disables it");
ABSL_FLAG(std::string, devices, "auto",
          "comma-separated torch devices, one worker and model replica each: "
          "cpu or cuda:0,cuda:1,...; auto = one CPU replica per available "
          "CPU, at most 4 (CPUs: the affinity mask lowered to the cgroup "
          "quota)");
ABSL_FLAG(int, threads, 0,
          "torch intra-op threads per replica; 0 = the available CPUs divided "
          "among the CPU replicas");
ABSL_FLAG(int, lone_threads, -1,
          "intra-op threads of a replica while it alone has work (a lone "
          "request then uses every core; back to --threads as soon as "
          "another replica has work; slower than --lone_split); -1 = off "
          "with --lone_split, else the usable CPUs with several CPU "
          "replicas, else off; 0 = off");
ABSL_FLAG(bool, heap_allocations, true,
          "keep large tensor allocations in malloc's heap instead of a fresh "
          "mmap each (page faults otherwise cost two CPU workers ~30% of "
          "their speed); false = glibc's default, for measurements");
ABSL_FLAG(bool, lone_split, true,
          "a replica that alone has work splits each forward pass's rows "
          "across every replica, each evaluating its share on its own "
          "thread at the same time (a lone request then uses every core)");
ABSL_FLAG(std::string, precision, "auto",
          "forward-pass precision: fp32, bf16 (autocast; 1.8-2.2x the rows/s "
          "on a CPU with AMX, 0.7x on one with only avx512_bf16) or auto "
          "(measured at start-up: bf16 where the device computes it natively "
          "and it runs >= 1.15x fp32's rows/s, else fp32; GetModelInfo "
          "says why)");
ABSL_FLAG(bool, fuse_norm_silu, true,
          "run the network's group-norm-then-SiLU pairs as one fused "
          "operator (the same values to ~1e-6; docs/performance.md, \"Fused "
          "group norm + SiLU\"); false = the network's own operators");
ABSL_FLAG(std::string, score_precision, "fp32",
          "ScoreBPD rows: fp32 = in fp32 whatever --precision is (bf16 moves "
          "BPD; docs/performance.md), same = in --precision");
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

namespace {

// SIGTERM, SIGINT and SIGHUP, in whichever thread they land (OpenBLAS
// starts threads before main, so masking signals in main cannot cover every
// thread), only write their number to this pipe; the main thread reads it.
int g_signal_pipe[2] = {-1, -1};

extern "C" void OnTerminationSignal(int signal_number) {
  const int saved = errno;
  const char byte = static_cast<char>(signal_number);
  (void)!write(g_signal_pipe[1], &byte, 1);
  errno = saved;
}

bool InstallSignalHandlers() {
  if (pipe2(g_signal_pipe, O_CLOEXEC) != 0) return false;
  struct sigaction action {};
  action.sa_handler = OnTerminationSignal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  return sigaction(SIGTERM, &action, nullptr) == 0 &&
         sigaction(SIGINT, &action, nullptr) == 0 &&
         sigaction(SIGHUP, &action, nullptr) == 0;
}

// Blocks until a signal arrives; returns its number.
int WaitForSignal() {
  char byte = 0;
  while (read(g_signal_pipe[0], &byte, 1) != 1) {
    if (errno != EINTR) return 0;
  }
  return static_cast<unsigned char>(byte);
}

// The server's options as the flags give them (one assignment per flag).
vdm::VdmServer::Options OptionsFromFlags() {
  vdm::VdmServer::Options options;
  options.model_path = absl::GetFlag(FLAGS_model);
  options.model_repository = absl::GetFlag(FLAGS_model_repository);
  options.default_model = absl::GetFlag(FLAGS_default_model);
  options.repository_poll_seconds = absl::GetFlag(FLAGS_repository_poll_seconds);
  options.max_loaded_models = absl::GetFlag(FLAGS_max_loaded_models);
  options.calibration_path = absl::GetFlag(FLAGS_calibration);
  options.background_model_path = absl::GetFlag(FLAGS_background_model);
  options.feature_model_path = absl::GetFlag(FLAGS_feature_model);
  options.address = absl::GetFlag(FLAGS_address);
  options.metrics_address = absl::GetFlag(FLAGS_metrics_address);
  options.devices = absl::StrSplit(absl::GetFlag(FLAGS_devices), ',',
                                   absl::SkipWhitespace());
  options.threads = absl::GetFlag(FLAGS_threads);
  options.lone_threads = absl::GetFlag(FLAGS_lone_threads);
  options.lone_split = absl::GetFlag(FLAGS_lone_split);
  options.precision = absl::GetFlag(FLAGS_precision);
  options.score_precision = absl::GetFlag(FLAGS_score_precision);
  options.fuse_norm_silu = absl::GetFlag(FLAGS_fuse_norm_silu);
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
  return options;
}

// Waits for SIGTERM/SIGINT (SIGHUP: scans the model repository now), then
// drains for up to --drain_seconds and returns once the server has stopped.
void ServeUntilSignal(vdm::VdmServer& server) {
  int signal_number = WaitForSignal();
  while (signal_number == SIGHUP) {
    LOG(INFO) << "vdm-server: SIGHUP: scanning the model repository";
    server.Reload();
    signal_number = WaitForSignal();
  }
  LOG(INFO) << absl::StrFormat("vdm-server: signal %d, draining (up to %d s)",
                               signal_number,
                               absl::GetFlag(FLAGS_drain_seconds));
  // A second signal shortens the drain (in-flight calls fail with
  // UNAVAILABLE at once); it never skips it: the process still stops cleanly.
  vdm::VdmServer* raw = &server;
  std::thread([raw] {
    int again = WaitForSignal();
    while (again == SIGHUP) again = WaitForSignal();
    LOG(WARNING) << absl::StrFormat(
        "vdm-server: signal %d again, cutting the drain short", again);
    raw->HurryShutdown();
  }).detach();
  server.Shutdown(absl::Seconds(absl::GetFlag(FLAGS_drain_seconds)));
  server.Wait();
}

// Where the time went (docs/performance.md, "Worker busy fraction"), of a
// server up since `start`.
void LogWorkerTime(vdm::VdmServer& server, absl::Time start) {
  const double wall = absl::ToDoubleSeconds(absl::Now() - start);
  const std::vector<vdm::WorkerStats> stats = server.engine().worker_stats();
  for (size_t i = 0; i < stats.size(); ++i) {
    const vdm::WorkerStats& w = stats[i];
    LOG(INFO) << absl::StrFormat(
        "vdm-server: worker %d: %d batches, %d rows, forward %.2f s, host "
        "%.2f s of %.1f s up; %d rows evaluated for a lone worker",
        i, w.batches, w.rows, w.forward_seconds, w.host_seconds, wall,
        w.lent_rows);
  }
  LOG(INFO) << absl::StrFormat("vdm-server: completion thread: %.2f s",
                               server.engine().completion_seconds());
}

}  // namespace

int main(int argc, char** argv) {
  // Few malloc arenas: every gRPC, worker and torch thread otherwise gets
  // its own, and freed memory stays spread over them (the engine also trims
  // after finished requests; docs/performance.md, "Soak").
  // OpenMP threads that sleep instead of spinning while they wait, and no
  // OpenBLAS pool (unless set): re-executes once, before anything else runs.
  vdm::PrepareThreadPools(argv);
  mallopt(M_ARENA_MAX, 2);
  // First of all, so a signal during start-up is not fatal either.
  if (!InstallSignalHandlers()) {
    std::perror("vdm-server: cannot install signal handlers");
    return 1;
  }
  absl::SetProgramUsageMessage(
      "Serves a TorchScript Variational Diffusion Model over gRPC.\n"
      "  vdm-server --model=PATH.pt --address=HOST:PORT "
      "--metrics_address=HOST:PORT --threads=N");
  absl::ParseCommandLine(argc, argv);
  // Logs go to stderr (the container runtime collects them), one line per
  // request from server/request_log.cc.
  FLAGS_logtostderr = true;
  google::InitGoogleLogging(argv[0]);
  // Before the model loads (its tensors are the first large blocks).
  if (absl::GetFlag(FLAGS_heap_allocations) &&
      !vdm::KeepLargeAllocationsInHeap()) {
    LOG(WARNING) << "vdm-server: mallopt failed: large tensors stay mmap'ed";
  }

  const vdm::VdmServer::Options options = OptionsFromFlags();
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

  const absl::Time start = absl::Now();
  auto server = vdm::VdmServer::Create(options);
  if (!server.ok()) {
    std::fprintf(stderr, "vdm-server: %s\n",
                 std::string(server.status().message()).c_str());
    return 1;
  }
  LOG(INFO) << absl::StrFormat(
      "vdm-server: serving %s on port %d (metrics port %d), ready in %.1f s",
      options.model_repository.empty() ? options.model_path
                                       : options.model_repository,
      (*server)->port(), (*server)->metrics_port(),
      absl::ToDoubleSeconds(absl::Now() - start));
  ServeUntilSignal(**server);
  LogWorkerTime(**server, start);
  LOG(INFO) << "vdm-server: stopped";
  return 0;
}
