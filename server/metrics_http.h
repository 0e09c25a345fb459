// A minimal HTTP/1.1 endpoint that serves GET /metrics (and GET /healthz)
// from a Metrics registry.
//
// Why not prometheus::Exposer: Debian's civetweb 1.15 (behind prometheus-cpp's
// Exposer) refuses to start ("null context when constructing CivetServer")
// in any process that links Debian's libtorch_cpu, although the port binds;
// a three-line program with and without libtorch_cpu shows it. Until that is
// understood, this endpoint serves the same text exposition format.
//
// Thread-safe: one accept thread serves requests one at a time (scrapes are
// rare and small); Stop() may be called from any thread.
#ifndef VDM_SERVER_METRICS_HTTP_H_
#define VDM_SERVER_METRICS_HTTP_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace vdm {

class MetricsHttpServer {
 public:
  // Listens on `address` (HOST:PORT, IPv4 or a name; port 0 picks a free
  // port) and answers GET /metrics with `scrape()`.
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, std::function<std::string()> scrape);
  ~MetricsHttpServer();

  int port() const { return port_; }
  void Stop();

 private:
  MetricsHttpServer(int fd, int port, std::function<std::string()> scrape);
  void Serve();
  void Answer(int client);

  const int fd_;
  const int port_;
  const std::function<std::string()> scrape_;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

}  // namespace vdm

#endif  // VDM_SERVER_METRICS_HTTP_H_
