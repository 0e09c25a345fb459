// The HTTP side of the server, on its own port: GET /metrics (Prometheus
// text format), /livez (the process answers), /readyz (200 only while the
// server is ready to serve: model loaded, warmed up, not draining; 503
// otherwise) and /healthz (kept as an alias of /readyz for old probes).
//
// Served by cpp-httplib (Debian's libcpp-httplib) with a thread pool and
// read/write timeouts, so one slow or stuck client cannot block the others.
// Why not prometheus::Exposer: Debian's civetweb starts its threads with a
// fixed 100 KiB stack, and a process that links libtorch_cpu, OpenBLAS and
// glog needs about 106 KiB of static thread-local storage, so its
// pthread_create fails; std::thread (cpp-httplib) uses the default stack.
//
// Thread-safe: Stop() may be called from any thread, once or more.
#ifndef VDM_SERVER_METRICS_HTTP_H_
#define VDM_SERVER_METRICS_HTTP_H_

#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace httplib {
class Server;
}

namespace vdm {

class MetricsHttpServer {
 public:
  struct Handlers {
    std::function<std::string()> scrape;  // the /metrics body
    std::function<bool()> ready;          // /readyz: 200 when true
  };
  // Listens on `address` (HOST:PORT, [IPv6]:PORT or *:PORT; port 0 picks a
  // free port).
  static absl::StatusOr<std::unique_ptr<MetricsHttpServer>> Start(
      const std::string& address, Handlers handlers);
  ~MetricsHttpServer();

  int port() const { return port_; }
  void Stop();

 private:
  MetricsHttpServer() = default;

  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
  std::thread thread_;
};

}  // namespace vdm

#endif  // VDM_SERVER_METRICS_HTTP_H_
