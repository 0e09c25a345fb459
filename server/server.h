// The whole vdm-server process minus its flags: starts the engine (one
// worker per device), loads the model repository (model_repository.h: a
// replica of every model version per device, checked and warmed up), starts
// the gRPC server (VdmService, health, reflection) and the metrics
// endpoint, then reports SERVING. A repository poll thread (and Reload)
// swaps in new versions while it serves.
// Thread-safe: Shutdown and Reload may be called from any thread.
#ifndef VDM_SERVER_SERVER_H_
#define VDM_SERVER_SERVER_H_

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "server/engine.h"
#include "server/metrics.h"
#include "server/model_repository.h"
#include "server/service.h"

namespace vdm {

class VdmServer {
 public:
  struct Options {
    // A model repository directory (model_repository.h); empty = serve
    // `model_path` alone, as a repository of one.
    std::string model_repository;
    // With a repository: the model of requests that name none (empty = the
    // first by name); seconds between scans for new versions (0 = only at
    // start-up and on Reload); models loaded at most.
    std::string default_model;
    int repository_poll_seconds = 0;
    int max_loaded_models = 8;
    std::string model_path;
    // Anomaly calibration of `model_path` (model/vdm/anomaly.h, written by
    // vdm-calibrate): empty = <model_path>.calibration.json when it exists;
    // "none" = none. (In a repository, beside each version's model.pt.)
    std::string calibration_path;
    // A background model for the likelihood ratio (ImageScore.llr) of
    // `model_path`, loaded once per device beside it; empty = none. It must
    // have the model's image shape and num_classes (else Create fails). (In
    // a repository: background.pt beside a version's model.pt.)
    std::string background_model_path;
    // The feature network of the thorough anomaly level (feature_model.h)
    // of `model_path`: empty = <model_path>.features.pt when it exists;
    // "none" = none. (In a repository: model.pt.features.pt beside a
    // version's model.pt.)
    std::string feature_model_path;
    std::string address = "0.0.0.0:50051";  // port 0 picks a free port
    std::string metrics_address;            // empty = no /metrics endpoint
    // One worker and model replica per device; {"auto"} = ResolveLayout's
    // CPU replicas. vdm-server's default is "auto", this struct's "cpu".
    std::vector<std::string> devices = {"cpu"};
    // Torch intra-op threads (per worker: each runs its own OpenMP team);
    // 0 = the CPUs available divided among the CPU replicas (ResolveLayout).
    int threads = 0;
    // A worker alone busy splits each forward pass across every replica
    // (Engine::Options::lone_split): a lone request uses every device.
    bool lone_split = true;
    // Threads of a worker that is alone busy (Engine::Options::lone_threads;
    // the older way to the same end): -1 = automatic: off with lone_split,
    // else the usable CPUs when there are several CPU replicas and no other
    // device (ResolveLayout), else 0 = off.
    int lone_threads = -1;
    // Forward-pass precision of every replica: fp32, bf16 or auto
    // (TorchScriptModel::Options::precision); ScoreBPD rows: "fp32" = in fp32
    // whatever `precision` is, "same" = in `precision`.
    std::string precision = "fp32";
    std::string score_precision = "fp32";
    // Every replica's network runs its group-norm-then-SiLU pairs as one
    // fused operator (TorchScriptModel::Options::fuse_norm_silu).
    bool fuse_norm_silu = true;
    Engine::Options engine;
    VdmServiceImpl::Options limits;
    int max_message_mb = 64;                // gRPC receive/send limit, MiB
    // TLS: PEM files; both empty = plaintext. With a client CA, clients must
    // present a certificate it signed (mTLS).
    std::string tls_cert_file, tls_key_file, tls_client_ca_file;
    // A file holding the bearer token VdmService calls must carry; empty =
    // no authentication. Health and reflection stay open for probes.
    std::string auth_token_file;
    // Also told of the engine's events, beside the metrics (tests wait on
    // it); null = none. Must outlive the server.
    EngineObserver* observer = nullptr;
  };

  // Fails, before loading anything, on options that ValidateOptions
  // refuses.
  static absl::StatusOr<std::unique_ptr<VdmServer>> Create(
      const Options& options);
  ~VdmServer();

  int port() const { return port_; }
  int metrics_port() const { return metrics_->port(); }
  Metrics& metrics() { return *metrics_; }
  Engine& engine() { return *engine_; }
  ModelRepository& repository() { return *repository_; }

  // Scans the repository now (SIGHUP), off the caller's thread; a scan in
  // progress is followed by one more. Returns at once.
  void Reload();

  // The first half of Shutdown, at once: health goes NOT_SERVING and new
  // calls get UNAVAILABLE. Idempotent.
  void StartDraining();
  // Graceful shutdown: StartDraining; in-flight calls get until `grace` to
  // finish; the rest fail with UNAVAILABLE; then the gRPC server stops.
  // Idempotent.
  void Shutdown(absl::Duration grace);
  // Ends the grace period of a Shutdown in progress (or the next one) now:
  // what is still running fails with UNAVAILABLE. Thread-safe.
  void HurryShutdown() { hurry_ = true; }
  // Blocks until the gRPC server has shut down.
  void Wait();

 private:
  VdmServer() = default;
  // Loads a model version onto every device (the repository's Loader).
  absl::StatusOr<std::shared_ptr<ServedModel>> LoadVersion(
      const VersionFiles& files, const Options& options);
  // A few small requests on a freshly loaded version (the repository's
  // WarmUp), so its first caller does not pay for lazy initialisation.
  absl::Status WarmUp(const ServedModel& model);
  void PollRepository(int seconds);
  absl::Status Listen(const Options& options);
  void SetServing(bool serving);

  // Forwards each engine event to the metrics and Options::observer.
  class ObserverPair : public EngineObserver {
   public:
    ObserverPair(EngineObserver* a, EngineObserver* b) : a_(a), b_(b) {}
    void OnAdmitted(const char* method) override {
      Both(&EngineObserver::OnAdmitted, method);
    }
    void OnQueueTime(const char* method, double s) override {
      Both(&EngineObserver::OnQueueTime, method, s);
    }
    void OnCancelled(const char* reason) override {
      Both(&EngineObserver::OnCancelled, reason);
    }
    void OnBatch(int rows, int max_batch, double s) override {
      Both(&EngineObserver::OnBatch, rows, max_batch, s);
    }
    void OnEvaluated(int64_t rows) override {
      Both(&EngineObserver::OnEvaluated, rows);
    }
    void OnWorkerLoad(int w, double q, double l, double r) override {
      Both(&EngineObserver::OnWorkerLoad, w, q, l, r);
    }
    void OnWorkerSeconds(int w, double f, double h) override {
      Both(&EngineObserver::OnWorkerSeconds, w, f, h);
    }
    void OnCompletionSeconds(double s) override {
      Both(&EngineObserver::OnCompletionSeconds, s);
    }

   private:
    template <class... Args, class... Given>
    void Both(void (EngineObserver::*event)(Args...), Given... given) {
      (a_->*event)(given...);
      if (b_ != nullptr) (b_->*event)(given...);
    }
    EngineObserver* const a_;
    EngineObserver* const b_;
  };

  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<ObserverPair> observers_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<ModelRepository> repository_;
  std::unique_ptr<VdmServiceImpl> service_;
  // The repository poll thread and what wakes it.
  std::thread poller_;
  absl::Mutex poll_mu_;
  bool reload_requested_ ABSL_GUARDED_BY(poll_mu_) = false;
  bool stop_polling_ ABSL_GUARDED_BY(poll_mu_) = false;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::atomic<bool> draining_{false};
  std::atomic<bool> hurry_{false};
  std::atomic<bool> shut_down_{false};
};

// Checks every start-up setting and names the vdm-server flag at fault:
// limits must be positive (a server that refuses everything is a
// misconfiguration), --max_message_mb in [1, 2047], and addresses HOST:PORT
// (or [IPv6]:PORT, or unix:PATH) with PORT in [0, 65535].
absl::Status ValidateOptions(const VdmServer::Options& options);

// The replicas and threads a server runs with on `cpus` usable CPUs
// (model/vdm/cpus.h AvailableCpus), as VdmServer::Create applies them:
// - devices {"auto"}: min(cpus, kMaxAutoCpuReplicas) CPU replicas. On this
//   project's 2-core machines one single-threaded replica per core serves
//   more, and a lone request faster, than one replica on 2 threads
//   (docs/performance.md, "Replicas and threads"); the cap keeps a large
//   machine from splitting moderate load into many small batches.
// - threads 0: max(1, cpus / CPU replicas), or cpus with no CPU replica.
// - lone_threads -1: 0 with lone_split (the split already uses every
//   replica); else cpus when every device is a CPU replica, there are
//   several and each has fewer threads than cpus (a lone request then uses
//   every core); else 0.
// Anything else is kept as given. "auto" must stand alone.
inline constexpr int kMaxAutoCpuReplicas = 4;
absl::StatusOr<VdmServer::Options> ResolveLayout(VdmServer::Options options,
                                                 int cpus);

}  // namespace vdm

#endif  // VDM_SERVER_SERVER_H_
