#include "server/metrics.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_cat.h"
#include "prometheus/text_serializer.h"

namespace vdm {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

Histogram::BucketBoundaries LatencyBuckets() {
  return {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

}  // namespace

// One piece though long: a flat list of registrations, one per metric family.
Metrics::Metrics() : registry_(std::make_shared<prometheus::Registry>()) {
  auto& r = *registry_;
  requests_ = &BuildCounter()
                   .Name("vdm_requests_total")
                   .Help("RPCs finished, by method and gRPC status code")
                   .Register(r);
  latency_ = &BuildHistogram()
                  .Name("vdm_request_latency_seconds")
                  .Help("RPC latency from arrival to finish, by method")
                  .Register(r);
  queue_time_ = &BuildHistogram()
                     .Name("vdm_queue_time_seconds")
                     .Help("Time from arrival to the first forward pass")
                     .Register(r);
  cancelled_ = &BuildCounter()
                    .Name("vdm_requests_stopped_total")
                    .Help("Requests stopped before completion, by reason")
                    .Register(r);
  queue_depth_ = &BuildGauge()
                      .Name("vdm_queue_depth")
                      .Help("Requests admitted but not yet started, by worker")
                      .Register(r);
  live_requests_ = &BuildGauge()
                        .Name("vdm_live_requests")
                        .Help("Requests being computed, by worker")
                        .Register(r);
  queued_rows_ = &BuildGauge()
                      .Name("vdm_queued_rows")
                      .Help("Rows admitted but not yet evaluated, by worker")
                      .Register(r);
  worker_seconds_ = &BuildCounter()
                         .Name("vdm_worker_seconds_total")
                         .Help("Worker time by phase: forward (the network) "
                               "or host (gathering rows, advancing and "
                               "retiring requests); their sum over wall time "
                               "is the worker's busy fraction")
                         .Register(r);
  completion_seconds_ = &BuildCounter()
                             .Name("vdm_completion_seconds_total")
                             .Help("Time the completion thread spent "
                                   "delivering results and progress (PNG "
                                   "encoding, responses), off the workers")
                             .Register(r)
                             .Add({});
  batch_rows_ = &BuildHistogram()
                     .Name("vdm_batch_rows")
                     .Help("Rows per forward pass")
                     .Register(r)
                     .Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32,
                                                          64, 128, 256, 512});
  batch_fill_ = &BuildHistogram()
                     .Name("vdm_batch_fill_ratio")
                     .Help("Rows per forward pass divided by max_batch")
                     .Register(r)
                     .Add({}, Histogram::BucketBoundaries{0.1, 0.25, 0.5, 0.75,
                                                          0.9, 1.0});
  forward_seconds_ = &BuildHistogram()
                          .Name("vdm_forward_seconds")
                          .Help("Time of one batched forward pass")
                          .Register(r)
                          .Add({}, LatencyBuckets());
  evaluations_ = &BuildCounter()
                      .Name("vdm_network_evaluations_total")
                      .Help("Image rows evaluated by the network")
                      .Register(r)
                      .Add({});
  images_generated_ = &BuildCounter()
                           .Name("vdm_images_generated_total")
                           .Help("Images returned by Sample")
                           .Register(r)
                           .Add({});
  images_scored_ = &BuildCounter()
                        .Name("vdm_images_scored_total")
                        .Help("Images scored by ScoreBPD")
                        .Register(r)
                        .Add({});
  anomaly_ = &BuildHistogram()
                  .Name("vdm_anomaly_score")
                  .Help("Calibrated anomaly scores returned by ScoreBPD "
                        "(negative log-density; drift shows as a shift)")
                  .Register(r)
                  .Add({}, Histogram::BucketBoundaries{-20, -15, -10, -5, 0,
                                                       5, 10, 20, 50, 100});
  flagged_ = &BuildCounter()
                  .Name("vdm_flagged_images_total")
                  .Help("Images ScoreBPD flagged as anomalous (is_anomaly)")
                  .Register(r)
                  .Add({});
  build_info_ = &BuildGauge()
                     .Name("vdm_build_info")
                     .Help("Always 1: the server's version and the served "
                           "model (path, prediction, parameter count, "
                           "forward precision)")
                     .Register(r);
  precision_rates_ =
      &BuildGauge()
           .Name("vdm_precision_rows_per_second")
           .Help("Forward rows per second measured at start-up in each "
                 "precision by --precision=auto (0 = not measured)")
           .Register(r);
  model_requests_ = &BuildCounter()
                         .Name("vdm_model_requests_total")
                         .Help("RPCs finished, by model version, method and "
                               "gRPC status code")
                         .Register(r);
  model_rows_ = &BuildCounter()
                     .Name("vdm_model_rows_total")
                     .Help("Network rows of finished requests, by model "
                           "version")
                     .Register(r);
  model_state_ = &BuildGauge()
                      .Name("vdm_model_state")
                      .Help("1 for each model version the repository lists, "
                            "labelled with its state (loading, ready, "
                            "failed, unloading)")
                      .Register(r);
  model_memory_ = &BuildGauge()
                       .Name("vdm_model_memory_bytes")
                       .Help("Parameters and buffers of a model version's "
                             "replicas, bytes")
                       .Register(r);
  model_load_failures_ = &BuildCounter()
                              .Name("vdm_model_load_failures_total")
                              .Help("Model versions that failed to load or "
                                    "were refused, by model")
                              .Register(r);
  ready_gauge_ = &BuildGauge()
                     .Name("vdm_ready")
                     .Help("1 while the server is ready to serve (model "
                           "loaded, warmed up, not draining), else 0; "
                           "/readyz answers 200 exactly then")
                     .Register(r)
                     .Add({});
  bpd_ = &BuildHistogram()
              .Name("vdm_returned_bpd")
              .Help("Bits per dimension returned by ScoreBPD (drift monitor)")
              .Register(r)
              .Add({}, Histogram::BucketBoundaries{1, 2, 2.5, 3, 3.5, 4, 5, 6,
                                                   8, 10});
}

Metrics::~Metrics() {
  if (http_) http_->Stop();
}

absl::Status Metrics::Expose(const std::string& address) {
  absl::StatusOr<std::unique_ptr<MetricsHttpServer>> http =
      MetricsHttpServer::Start(
          address, {[this] { return Scrape(); }, [this] { return ready(); }});
  if (!http.ok()) return http.status();
  http_ = *std::move(http);
  return absl::OkStatus();
}

void Metrics::SetBuildInfo(const std::string& version, const std::string& model,
                           const std::string& prediction, int64_t parameters,
                           const std::string& precision) {
  build_info_
      ->Add({{"version", version},
             {"model", model},
             {"prediction", prediction},
             {"parameters", std::to_string(parameters)},
             {"precision", precision}})
      .Set(1);
}

void Metrics::RecordModelRequest(const std::string& model, int64_t version,
                                 const std::string& method,
                                 const std::string& code, int64_t rows) {
  const std::string v = std::to_string(version);
  absl::MutexLock lock(&models_mu_);
  auto it = version_series_.find(model + "/" + v);
  if (it == version_series_.end()) return;  // not listed (any more)
  prometheus::Counter& requests = model_requests_->Add(
      {{"model", model}, {"version", v}, {"method", method}, {"code", code}});
  requests.Increment();
  prometheus::Counter& row_counter =
      model_rows_->Add({{"model", model}, {"version", v}});
  row_counter.Increment(static_cast<double>(rows));
  for (prometheus::Counter* c : {&requests, &row_counter}) {
    auto& list = it->second.counters;
    if (std::find(list.begin(), list.end(), c) == list.end()) list.push_back(c);
  }
}

void Metrics::SetModelVersions(const std::vector<ModelVersion>& versions) {
  absl::MutexLock lock(&models_mu_);
  std::map<std::string, VersionSeries> next;
  for (const ModelVersion& m : versions) {
    const std::string v = std::to_string(m.version);
    const std::string key = m.name + "/" + v;
    VersionSeries series;
    if (auto old = version_series_.find(key); old != version_series_.end()) {
      series = std::move(old->second);
      version_series_.erase(old);
    }
    if (m.state == "failed" && series.state != "failed") {
      model_load_failures_->Add({{"model", m.name}}).Increment();
    }
    if (series.state != m.state) {
      for (prometheus::Gauge* g : series.gauges) {
        if (g != nullptr) model_state_->Remove(g);
      }
      series.gauges = {&model_state_->Add(
          {{"model", m.name}, {"version", v}, {"state", m.state}})};
      series.gauges.front()->Set(1);
      series.state = m.state;
    }
    model_memory_->Add({{"model", m.name}, {"version", v}})
        .Set(static_cast<double>(m.memory_bytes));
    next[key] = std::move(series);
  }
  // What left the list: its series go.
  for (auto& [key, series] : version_series_) {
    for (prometheus::Gauge* g : series.gauges) model_state_->Remove(g);
    for (prometheus::Counter* c : series.counters) {
      model_requests_->Remove(c);
      model_rows_->Remove(c);
    }
    const size_t slash = key.rfind('/');
    prometheus::Gauge& memory = model_memory_->Add(
        {{"model", key.substr(0, slash)}, {"version", key.substr(slash + 1)}});
    model_memory_->Remove(&memory);
  }
  version_series_ = std::move(next);
}

void Metrics::SetPrecisionRates(double fp32, double bf16) {
  precision_rates_->Add({{"precision", "fp32"}}).Set(fp32);
  precision_rates_->Add({{"precision", "bf16"}}).Set(bf16);
}

void Metrics::SetReady(bool ready) {
  ready_ = ready;
  ready_gauge_->Set(ready ? 1 : 0);
}

int Metrics::port() const { return http_ ? http_->port() : 0; }

std::string Metrics::Scrape() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

void Metrics::RecordRequest(const std::string& method, const std::string& code,
                            double latency_seconds) {
  requests_->Add({{"method", method}, {"code", code}}).Increment();
  latency_->Add({{"method", method}}, LatencyBuckets())
      .Observe(latency_seconds);
}

void Metrics::RecordQueueTime(const std::string& method, double seconds) {
  queue_time_->Add({{"method", method}}, LatencyBuckets()).Observe(seconds);
}

void Metrics::RecordBatch(int rows, int max_batch, double forward_seconds) {
  batch_rows_->Observe(rows);
  batch_fill_->Observe(max_batch > 0 ? static_cast<double>(rows) / max_batch
                                     : 0.0);
  forward_seconds_->Observe(forward_seconds);
  evaluations_->Increment(rows);
}

Metrics::WorkerSeconds Metrics::WorkerSecondsOf(int worker) {
  const std::string w = std::to_string(worker);
  return {&worker_seconds_->Add({{"worker", w}, {"phase", "forward"}}),
          &worker_seconds_->Add({{"worker", w}, {"phase", "host"}})};
}

void Metrics::OnWorkerSeconds(int worker, double forward, double host) {
  WorkerSeconds seconds;
  {
    absl::MutexLock lock(&worker_seconds_mu_);
    while (static_cast<int>(worker_seconds_of_.size()) <= worker) {
      worker_seconds_of_.push_back(
          WorkerSecondsOf(static_cast<int>(worker_seconds_of_.size())));
    }
    seconds = worker_seconds_of_[worker];
  }
  seconds.forward->Increment(forward);
  seconds.host->Increment(host);
}

void Metrics::SetWorkerLoad(int worker, double queued_requests,
                            double live_requests, double queued_rows) {
  const std::map<std::string, std::string> labels = {
      {"worker", std::to_string(worker)}};
  queue_depth_->Add(labels).Set(queued_requests);
  live_requests_->Add(labels).Set(live_requests);
  queued_rows_->Add(labels).Set(queued_rows);
}

void Metrics::AddCancelled(const std::string& reason) {
  cancelled_->Add({{"reason", reason}}).Increment();
}

}  // namespace vdm
