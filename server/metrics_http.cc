#include "server/metrics_http.h"

#include <httplib.h>

#include <algorithm>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace vdm {
namespace {

// Worker threads of the HTTP pool: scrapes and probes are small, but a few
// slow clients must not take every thread.
constexpr size_t kHttpThreads = 8;
constexpr time_t kTimeoutSeconds = 5;

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::Start(
    const std::string& address, Handlers handlers) {
  const size_t colon = address.rfind(':');
  int port = -1;
  if (colon == std::string::npos ||
      !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 0 ||
      port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        "metrics_address '", address, "' must be HOST:PORT or [IPv6]:PORT"));
  }
  std::string host = address.substr(0, colon);
  if (host.empty() || host == "*") host = "0.0.0.0";
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer());
  server->http_ = std::make_unique<httplib::Server>();
  httplib::Server& http = *server->http_;
  http.new_task_queue = [] { return new httplib::ThreadPool(kHttpThreads); };
  http.set_read_timeout(kTimeoutSeconds, 0);
  http.set_write_timeout(kTimeoutSeconds, 0);
  http.set_idle_interval(0, 100000);
  http.set_keep_alive_timeout(kTimeoutSeconds);
  auto scrape = std::move(handlers.scrape);
  auto ready = std::move(handlers.ready);
  http.Get("/metrics", [scrape](const httplib::Request&, httplib::Response& r) {
    r.set_content(scrape(), "text/plain; version=0.0.4");
  });
  http.Get("/livez", [](const httplib::Request&, httplib::Response& r) {
    r.set_content("ok\n", "text/plain");
  });
  auto readyz = [ready](const httplib::Request&, httplib::Response& r) {
    const bool ok = !ready || ready();
    r.status = ok ? 200 : 503;
    r.set_content(ok ? "ready\n" : "not ready\n", "text/plain");
  };
  http.Get("/readyz", readyz);
  http.Get("/healthz", readyz);
  const int bound = port == 0 ? http.bind_to_any_port(host)
                              : (http.bind_to_port(host, port) ? port : -1);
  if (bound <= 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", address,
                     " (address in use or not resolvable)"));
  }
  server->port_ = bound;
  server->thread_ = std::thread([&http] { http.listen_after_bind(); });
  return server;
}

MetricsHttpServer::~MetricsHttpServer() { Stop(); }

void MetricsHttpServer::Stop() {
  if (http_) http_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace vdm
