// Prometheus metrics of the server (prometheus-cpp), served on their own
// port with the /livez and /readyz probes (metrics_http.h). One Metrics object per server; all methods are thread-safe
// (prometheus-cpp metrics are atomic).
#ifndef VDM_SERVER_METRICS_H_
#define VDM_SERVER_METRICS_H_

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "server/engine_observer.h"
#include "server/metrics_http.h"

namespace vdm {

class Metrics : public EngineObserver {
 public:
  Metrics();
  ~Metrics();

  // Serves /metrics on `address` (HOST:PORT; port 0 picks a free one).
  absl::Status Expose(const std::string& address);
  // vdm_build_info{version, model, prediction, parameters, precision} = 1.
  void SetBuildInfo(const std::string& version, const std::string& model,
                    const std::string& prediction, int64_t parameters,
                    const std::string& precision = "fp32");
  // vdm_precision_rows_per_second{precision}: what --precision=auto
  // measured at start-up.
  void SetPrecisionRates(double fp32, double bf16);
  // Readiness as /readyz and vdm_ready report it (the server sets it when
  // it reports SERVING on the health service, and clears it when draining).
  void SetReady(bool ready);
  bool ready() const { return ready_; }
  // The port /metrics listens on, or 0 when not exposed.
  int port() const;
  // The text exposition format of every metric, as /metrics serves it.
  std::string Scrape() const;

  // RPC layer: one call finished with `code` (a grpc::StatusCode name).
  void RecordRequest(const std::string& method, const std::string& code,
                     double latency_seconds);

  // Model repository. Series carry `model` and `version` labels only for
  // versions the repository lists (names come from its folders, never from
  // requests), and a version's series go when it leaves the list, so the
  // label sets stay bounded by the repository.
  // vdm_model_requests_total{model,version,method,code} and
  // vdm_model_rows_total{model,version}: a call resolved to that version.
  void RecordModelRequest(const std::string& model, int64_t version,
                          const std::string& method, const std::string& code,
                          int64_t rows);
  struct ModelVersion {
    std::string name;
    int64_t version = 0;
    std::string state;  // loading, ready, failed, unloading
    int64_t memory_bytes = 0;
  };
  // The repository's list after a change: vdm_model_state{model,version,
  // state} = 1, vdm_model_memory_bytes{model,version}, and
  // vdm_model_load_failures_total{model} counts versions newly failed.
  void SetModelVersions(const std::vector<ModelVersion>& versions);
  void RecordBpd(double bpd) { bpd_->Observe(bpd); }
  // A calibrated anomaly score, and whether the image was flagged.
  void RecordAnomaly(double score, bool flagged) {
    anomaly_->Observe(score);
    if (flagged) flagged_->Increment();
  }

  // Engine.
  void RecordQueueTime(const std::string& method, double seconds);
  void RecordBatch(int rows, int max_batch, double forward_seconds);
  // Per worker (device): requests admitted but not started, requests being
  // computed, and rows admitted but not yet evaluated (compare with
  // --max_queued_rows for saturation).
  void SetWorkerLoad(int worker, double queued_requests, double live_requests,
                     double queued_rows);
  // The counters of a worker's seconds in the forward pass and around it
  // (vdm_worker_seconds_total{phase=forward|host}); the worker looks them
  // up once and increments them every iteration.
  struct WorkerSeconds {
    prometheus::Counter* forward;
    prometheus::Counter* host;
  };
  WorkerSeconds WorkerSecondsOf(int worker);
  void AddCompletionSeconds(double s) { completion_seconds_->Increment(s); }
  void AddImagesGenerated(double n) { images_generated_->Increment(n); }
  void AddImagesScored(double n) { images_scored_->Increment(n); }
  void AddCancelled(const std::string& reason);

  // The engine's events (engine_observer.h) as the metrics above.
  void OnQueueTime(const char* method, double seconds) override {
    RecordQueueTime(method, seconds);
  }
  void OnCancelled(const char* reason) override { AddCancelled(reason); }
  void OnBatch(int rows, int max_batch, double forward_seconds) override {
    RecordBatch(rows, max_batch, forward_seconds);
  }
  void OnWorkerLoad(int worker, double queued, double live,
                    double queued_rows) override {
    SetWorkerLoad(worker, queued, live, queued_rows);
  }
  void OnWorkerSeconds(int worker, double forward, double host) override;
  void OnCompletionSeconds(double seconds) override {
    AddCompletionSeconds(seconds);
  }

 private:
  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<MetricsHttpServer> http_;
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* latency_;
  prometheus::Family<prometheus::Histogram>* queue_time_;
  prometheus::Family<prometheus::Counter>* cancelled_;
  prometheus::Family<prometheus::Gauge>* queue_depth_;
  prometheus::Family<prometheus::Gauge>* live_requests_;
  prometheus::Family<prometheus::Gauge>* queued_rows_;
  prometheus::Family<prometheus::Counter>* worker_seconds_;
  prometheus::Counter* completion_seconds_;
  prometheus::Histogram* batch_rows_;
  prometheus::Histogram* batch_fill_;
  prometheus::Histogram* forward_seconds_;
  prometheus::Counter* evaluations_;
  prometheus::Counter* images_generated_;
  prometheus::Counter* images_scored_;
  prometheus::Histogram* bpd_;
  prometheus::Gauge* ready_gauge_;
  prometheus::Histogram* anomaly_;
  prometheus::Counter* flagged_;
  prometheus::Family<prometheus::Gauge>* build_info_;
  prometheus::Family<prometheus::Gauge>* precision_rates_;
  prometheus::Family<prometheus::Counter>* model_requests_;
  prometheus::Family<prometheus::Counter>* model_rows_;
  prometheus::Family<prometheus::Gauge>* model_state_;
  prometheus::Family<prometheus::Gauge>* model_memory_;
  prometheus::Family<prometheus::Counter>* model_load_failures_;
  // Per listed version ("name/version"): its state, and every series with
  // its labels, removed when it leaves the list.
  struct VersionSeries {
    std::string state;
    std::vector<prometheus::Counter*> counters;
    std::vector<prometheus::Gauge*> gauges;
  };
  absl::Mutex models_mu_;
  std::map<std::string, VersionSeries> version_series_
      ABSL_GUARDED_BY(models_mu_);
  // Each worker's seconds counters, looked up once (OnWorkerSeconds runs
  // every iteration of every worker).
  absl::Mutex worker_seconds_mu_;
  std::vector<WorkerSeconds> worker_seconds_of_
      ABSL_GUARDED_BY(worker_seconds_mu_);
  std::atomic<bool> ready_{false};
};

}  // namespace vdm

#endif  // VDM_SERVER_METRICS_H_
