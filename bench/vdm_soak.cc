// vdm-soak: a bounded soak test of a running vdm-server. `--concurrency`
// closed-loop callers send `--requests` calls of a fixed, deterministic mix:
// Sample with every sampler (some guided, PNG and raw), SampleStream with
// previews, ScoreBPD, calls cancelled by the client, calls whose deadline
// expires, and bad inputs (invalid fields, a PNG decompression bomb). Each
// kind has the status codes it may end with; anything else is an unexpected
// error. It prints the calls and errors by kind and code, p50/p99 latency per
// kind, and the server's resident memory (VmRSS of --server_pid): at the
// start, and after every finished call.
//
// Exit status 0 only when there was no unexpected error and the median RSS
// over the last quarter of the calls is within --max_rss_growth of the
// median over the second quarter (after warm-up). Medians, not single
// readings: one reading under load swings by 20% with what is in flight and
// when malloc last handed memory back, while a leak moves every reading.
#include <zlib.h>

#include <algorithm>
#include <condition_variable>
#include <atomic>
#include <cstdio>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "bench/load_util.h"
#include "model/vdm/sampler_config.h"
#include "proto/convert.h"
#include "vdm/v1/vdm.grpc.pb.h"

ABSL_FLAG(std::string, target, "localhost:50051", "server address");
ABSL_FLAG(int, concurrency, 64, "closed-loop callers");
ABSL_FLAG(int, requests, 10000, "total calls (bounded)");
ABSL_FLAG(double, duration_s, 3600, "stop issuing calls after this long");
ABSL_FLAG(int, server_pid, 0, "pid of the server, to read its VmRSS (0: skip)");
ABSL_FLAG(double, max_rss_growth, 0.2,
          "fail when the median RSS of the last quarter of the calls exceeds "
          "the second quarter's by more than this");
ABSL_FLAG(int, steps, 8, "steps of the sampling calls");

namespace {

using grpc::StatusCode;

struct Outcome {
  std::string kind;
  StatusCode code = StatusCode::OK;
  bool expected = true;
  double seconds = 0;
};

int64_t RssKb(int pid) {
  if (pid <= 0) return 0;
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6));
  }
  return 0;
}

// A 28x28 raw image with some structure.
std::string Pixels(int seed) {
  std::string p(28 * 28, '\0');
  for (int i = 0; i < 28 * 28; ++i) p[i] = static_cast<char>((i * (seed + 3)) % 256);
  return p;
}

// A valid PNG header declaring 16384 x 16384 pixels and almost no data.
std::string BombPng() {
  auto chunk = [](const std::string& type, const std::string& data) {
    std::string out;
    for (int s = 24; s >= 0; s -= 8) out += char(data.size() >> s);
    const std::string body = type + data;
    const uLong crc = crc32(0, reinterpret_cast<const Bytef*>(body.data()),
                            static_cast<uInt>(body.size()));
    out += body;
    for (int s = 24; s >= 0; s -= 8) out += char(crc >> s);
    return out;
  };
  std::string ihdr;
  for (uint32_t v : {16384u, 16384u}) {
    for (int s = 24; s >= 0; s -= 8) ihdr += char(v >> s);
  }
  ihdr += std::string("\x08\x00\x00\x00\x00", 5);
  return std::string("\x89PNG\r\n\x1a\n", 8) + chunk("IHDR", ihdr) +
         chunk("IDAT", std::string(64, 'x')) + chunk("IEND", "");
}

// The samplers of the library's table, in turn.
vdm::v1::Sampler SamplerOf(int i) {
  const std::vector<vdm::SamplerType>& all = vdm::AllSamplerTypes();
  return vdm::SamplerToProto(all[i % all.size()]);
}

vdm::v1::SampleRequest SampleRequest(int i) {
  vdm::v1::SampleRequest r;
  r.set_num_images(1 + i % 4);
  r.set_sampler(SamplerOf(i));
  r.set_steps(absl::GetFlag(FLAGS_steps));
  r.set_seed(i);
  r.set_format(i % 2 ? vdm::v1::IMAGE_FORMAT_PNG : vdm::v1::IMAGE_FORMAT_RAW);
  if (i % 3 == 0) {
    r.set_label(i % 10);
    r.set_guidance_scale(3.0f);
  }
  return r;
}

void Deadline(grpc::ClientContext* c, absl::Duration d) {
  c->set_deadline(absl::ToChronoTime(absl::Now() + d));
}

// The calls of the mix, by kind: call i on `context` (deadline 5 min), and
// how it ended.
grpc::Status CallSample(vdm::v1::VdmService::Stub& stub,
                        grpc::ClientContext* context, int i) {
  vdm::v1::SampleResponse resp;
  return stub.Sample(context, SampleRequest(i), &resp);
}

// With previews; DATA_LOSS when the stream ends OK without a result.
grpc::Status CallSampleStream(vdm::v1::VdmService::Stub& stub,
                              grpc::ClientContext* context, int i) {
  vdm::v1::SampleRequest r = SampleRequest(i);
  r.set_preview_every(2);
  auto reader = stub.SampleStream(context, r);
  vdm::v1::SampleStreamResponse m;
  bool result = false;
  while (reader->Read(&m)) result = result || m.has_result();
  grpc::Status status = reader->Finish();
  if (status.ok() && !result) status = grpc::Status(StatusCode::DATA_LOSS, "no result");
  return status;
}

grpc::Status CallScore(vdm::v1::VdmService::Stub& stub,
                       grpc::ClientContext* context, int i) {
  vdm::v1::ScoreRequest r;
  r.set_format(vdm::v1::IMAGE_FORMAT_RAW);
  r.set_timesteps(8 + 8 * (i % 2));
  r.set_seed(i);
  for (int k = 0; k < 1 + i % 8; ++k) r.add_images()->set_data(Pixels(i + k));
  vdm::v1::ScoreResponse resp;
  return stub.ScoreBPD(context, r, &resp);
}

// A long Sample the client cancels 20-69 ms after sending it.
grpc::Status CallCancelled(vdm::v1::VdmService::Stub& stub,
                           grpc::ClientContext* context, int i) {
  vdm::v1::SampleRequest r = SampleRequest(i);
  r.set_steps(1000);
  vdm::v1::SampleResponse resp;
  grpc::Status status;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  stub.async()->Sample(context, &r, &resp, [&](grpc::Status s) {
    std::lock_guard<std::mutex> lock(mu);
    status = s;
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  cv.wait_for(lock, std::chrono::milliseconds(20 + i % 50), [&] { return done; });
  lock.unlock();
  context->TryCancel();
  lock.lock();
  cv.wait(lock, [&] { return done; });
  return status;
}

// A long Sample on a context of its own whose deadline (30-99 ms) expires.
grpc::Status CallDeadline(vdm::v1::VdmService::Stub& stub, int i) {
  grpc::ClientContext short_context;
  Deadline(&short_context, absl::Milliseconds(30 + i % 70));
  vdm::v1::SampleRequest r = SampleRequest(i);
  r.set_steps(1000);
  vdm::v1::SampleResponse resp;
  return stub.Sample(&short_context, r, &resp);
}

// Every other one a PNG decompression bomb, else num_images = 0.
grpc::Status CallBadInput(vdm::v1::VdmService::Stub& stub,
                          grpc::ClientContext* context, int i) {
  if (i % 20 == 9) {
    vdm::v1::ScoreRequest r;
    r.set_format(vdm::v1::IMAGE_FORMAT_PNG);
    r.add_images()->set_data(BombPng());
    vdm::v1::ScoreResponse resp;
    return stub.ScoreBPD(context, r, &resp);
  }
  vdm::v1::SampleRequest r = SampleRequest(i);
  r.set_num_images(0);
  vdm::v1::SampleResponse resp;
  return stub.Sample(context, r, &resp);
}

// Call i of the mix; returns its kind and code, and whether the code is one
// its kind may end with.
Outcome Call(vdm::v1::VdmService::Stub& stub, int i) {
  Outcome out;
  const absl::Time start = absl::Now();
  grpc::ClientContext context;
  Deadline(&context, absl::Minutes(5));
  grpc::Status status;
  std::set<StatusCode> allowed = {StatusCode::OK};
  switch (i % 10) {
    case 0:
    case 1:
    case 2:
    case 3:
      out.kind = "Sample";
      status = CallSample(stub, &context, i);
      break;
    case 4:
      out.kind = "SampleStream";
      status = CallSampleStream(stub, &context, i);
      break;
    case 5:
    case 6:
      out.kind = "ScoreBPD";
      status = CallScore(stub, &context, i);
      break;
    case 7:  // cancelled by the client while it runs
      out.kind = "Cancelled";
      allowed = {StatusCode::CANCELLED, StatusCode::OK};
      status = CallCancelled(stub, &context, i);
      break;
    case 8:  // deadline expires
      out.kind = "Deadline";
      allowed = {StatusCode::DEADLINE_EXCEEDED, StatusCode::OK};
      status = CallDeadline(stub, i);
      break;
    case 9:  // bad input
      out.kind = "BadInput";
      allowed = {StatusCode::INVALID_ARGUMENT};
      status = CallBadInput(stub, &context, i);
      break;
  }
  out.code = status.error_code();
  out.expected = allowed.count(out.code) > 0;
  out.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return out;
}

const char* CodeName(StatusCode c) {
  switch (c) {
    case StatusCode::OK: return "OK";
    case StatusCode::CANCELLED: return "CANCELLED";
    case StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case StatusCode::INTERNAL: return "INTERNAL";
    case StatusCode::UNKNOWN: return "UNKNOWN";
    default: return "OTHER";
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Soak test of a running vdm-server: a bounded mixed load, errors by "
      "code, latency, and the server's RSS over time.");
  absl::ParseCommandLine(argc, argv);
  auto stub = vdm::bench::Connect(absl::GetFlag(FLAGS_target), "vdm-soak");
  if (stub == nullptr) return 1;
  const int pid = absl::GetFlag(FLAGS_server_pid);
  const int total = absl::GetFlag(FLAGS_requests);
  const absl::Time stop_at =
      absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_duration_s));
  const int64_t rss_start = RssKb(pid);
  std::atomic<int> next{0}, finished{0};
  std::mutex mu;
  std::vector<Outcome> outcomes;
  std::vector<std::pair<int, int64_t>> rss;  // (calls finished, VmRSS kB)
  const absl::Time start = absl::Now();
  std::vector<std::thread> callers;
  for (int c = 0; c < absl::GetFlag(FLAGS_concurrency); ++c) {
    callers.emplace_back([&] {
      for (int i = next++; i < total && absl::Now() < stop_at; i = next++) {
        Outcome o = Call(*stub, i);
        const int done = ++finished;
        const int64_t kb = RssKb(pid);
        std::lock_guard<std::mutex> lock(mu);
        outcomes.push_back(std::move(o));
        rss.emplace_back(done, kb);
      }
    });
  }
  for (auto& t : callers) t.join();
  const double wall = absl::ToDoubleSeconds(absl::Now() - start);
  const int64_t rss_end = RssKb(pid);

  std::map<std::string, std::map<std::string, int>> codes;
  std::map<std::string, std::vector<double>> latency;
  int unexpected = 0;
  for (const Outcome& o : outcomes) {
    ++codes[o.kind][CodeName(o.code)];
    if (o.code == StatusCode::OK) latency[o.kind].push_back(o.seconds);
    if (!o.expected) ++unexpected;
  }
  std::printf("calls: %zu in %.1f s (concurrency %d), unexpected errors: %d\n",
              outcomes.size(), wall, absl::GetFlag(FLAGS_concurrency),
              unexpected);
  std::printf("%-14s %-20s %7s\n", "kind", "code", "calls");
  for (const auto& [kind, by_code] : codes) {
    for (const auto& [code, n] : by_code) {
      std::printf("%-14s %-20s %7d\n", kind.c_str(), code.c_str(), n);
    }
  }
  std::printf("%-14s %7s %9s %9s\n", "kind (OK)", "calls", "p50 s", "p99 s");
  for (const auto& [kind, v] : latency) {
    std::printf("%-14s %7zu %9.3f %9.3f\n", kind.c_str(), v.size(),
                vdm::bench::Percentile(v, 0.5), vdm::bench::Percentile(v, 0.99));
  }
  bool rss_ok = true;
  if (pid > 0) {
    // The median reading of the calls finished in [from, to) of the total.
    const auto median = [&](double from, double to) -> int64_t {
      std::vector<int64_t> v;
      for (const auto& [done, kb] : rss) {
        if (done > from * total && done <= to * total) v.push_back(kb);
      }
      if (v.empty()) return 0;
      std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
      return v[v.size() / 2];
    };
    const int64_t second = median(0.25, 0.5), last = median(0.75, 1.0);
    const double growth =
        second > 0 ? static_cast<double>(last) / second - 1 : 0;
    rss_ok = growth <= absl::GetFlag(FLAGS_max_rss_growth);
    std::printf("server RSS: start %.1f MB, median of the 2nd quarter %.1f "
                "MB, of the last %.1f MB (%+.1f%%, limit %+.0f%%), end %.1f "
                "MB\n",
                rss_start / 1024.0, second / 1024.0, last / 1024.0,
                100 * growth, 100 * absl::GetFlag(FLAGS_max_rss_growth),
                rss_end / 1024.0);
  }
  const bool ok = unexpected == 0 && rss_ok &&
                  static_cast<int>(outcomes.size()) == total;
  std::printf("%s\n", ok ? "soak: PASS" : "soak: FAIL");
  return ok ? 0 : 1;
}
