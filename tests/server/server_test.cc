// Process-level behaviour of VdmServer: graceful shutdown, bearer-token auth,
// TLS and mTLS, and SampleStream, against the tiny exported model.
#include "server/server.h"
#include "server/testing/engine_events.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <future>
#include <vector>

#include "client/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "model/vdm/cpus.h"
#include "model/vdm/image_io.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;
using HealthResponse = grpc::health::v1::HealthCheckResponse;

std::string TestData(const std::string& name) {
  return std::string(VDM_TESTDATA_DIR) + "/" + name;
}

VdmServer::Options TinyOptions() {
  VdmServer::Options o;
  o.model_path = std::string(VDM_TEST_MODELS_DIR) + "/tiny.pt";
  o.address = "127.0.0.1:0";
  o.threads = 2;
  o.engine.max_batch = 32;
  return o;
}

std::unique_ptr<VdmServer> StartServer(const VdmServer::Options& options) {
  auto server = VdmServer::Create(options);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? *std::move(server) : nullptr;
}

std::string Target(const VdmServer& server) {
  return "127.0.0.1:" + std::to_string(server.port());
}

v1::SampleRequest Request(int n, int steps) {
  v1::SampleRequest r;
  r.set_num_images(n);
  r.set_steps(steps);
  r.set_seed(1);
  r.set_format(v1::IMAGE_FORMAT_RAW);
  return r;
}

grpc::Status Sample(v1::VdmService::Stub& stub, const v1::SampleRequest& r,
                    const std::string& token = "") {
  grpc::ClientContext context;
  if (!token.empty()) context.AddMetadata("authorization", "Bearer " + token);
  v1::SampleResponse response;
  return stub.Sample(&context, r, &response);
}

HealthResponse::ServingStatus Health(const std::shared_ptr<grpc::Channel>& ch) {
  auto stub = grpc::health::v1::Health::NewStub(ch);
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckRequest request;
  HealthResponse response;
  const grpc::Status s = stub->Check(&context, request, &response);
  return s.ok() ? response.status() : HealthResponse::UNKNOWN;
}

TEST(ServerTest, GracefulShutdownFinishesShortCallsAndFailsLongOnes) {
  // Batches of 2 rows: the short call gets a row at least every other
  // iteration whatever the machine's load, and the long one (8,000 rows)
  // is still running when the short one is done.
  VdmServer::Options options = TinyOptions();
  options.engine.max_batch = 2;
  EngineEvents events;
  options.observer = &events;
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  auto channel = grpc::CreateChannel(Target(*server),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::VdmService::NewStub(channel);
  ASSERT_EQ(Health(channel), HealthResponse::SERVING);
  auto long_call = std::async(std::launch::async,
                              [&] { return Sample(*stub, Request(8, 1000)); });
  auto short_call = std::async(std::launch::async,
                               [&] { return Sample(*stub, Request(1, 60)); });
  // Both are admitted (after the warm-up job) before the drain starts.
  ASSERT_TRUE(events.AwaitAdmitted(3, absl::Now() + absl::Seconds(60)));
  server->StartDraining();
  // A grace period far longer than the short call needs; it ends when the
  // short call is done (HurryShutdown, as a second SIGTERM does), so the
  // test waits for events, not for a real grace period.
  auto shutdown = std::async(std::launch::async,
                             [&] { server->Shutdown(absl::Seconds(120)); });
  EXPECT_EQ(Health(channel), HealthResponse::NOT_SERVING);
  const grpc::Status late = Sample(*stub, Request(1, 2));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_TRUE(short_call.get().ok());
  server->HurryShutdown();
  const grpc::Status long_status = long_call.get();
  EXPECT_EQ(long_status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(long_status.error_message(), HasSubstr("shutting down"));
  shutdown.get();
  server->Wait();
}

TEST(ServerTest, BearerTokenIsRequiredExceptForHealth) {
  const std::string token_file =
      ::testing::TempDir() + "/vdm_token_" + std::to_string(getpid());
  ASSERT_TRUE(WriteFileAtomic(token_file, "s3cret-token\n").ok());
  VdmServer::Options options = TinyOptions();
  options.auth_token_file = token_file;
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  auto channel = grpc::CreateChannel(Target(*server),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::VdmService::NewStub(channel);
  EXPECT_EQ(Health(channel), HealthResponse::SERVING);  // probes stay open
  const grpc::Status none = Sample(*stub, Request(1, 2));
  EXPECT_EQ(none.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(none.error_message(), HasSubstr("authorization"));
  const grpc::Status wrong = Sample(*stub, Request(1, 2), "s3cret-tokem");
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_TRUE(Sample(*stub, Request(1, 2), "s3cret-token").ok());
  // A right token followed by a second authorization entry is refused.
  grpc::ClientContext twice;
  twice.AddMetadata("authorization", "Bearer s3cret-token");
  twice.AddMetadata("authorization", "Bearer other");
  v1::SampleResponse response;
  const grpc::Status doubled = stub->Sample(&twice, Request(1, 2), &response);
  EXPECT_EQ(doubled.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_THAT(doubled.error_message(), HasSubstr("more than one"));
}

// GetModelInfo, failing the test when the call fails.
v1::ModelInfo Info(v1::VdmService::Stub& stub) {
  grpc::ClientContext context;
  v1::ModelInfo info;
  const grpc::Status status =
      stub.GetModelInfo(&context, v1::ModelInfoRequest(), &info);
  EXPECT_TRUE(status.ok()) << status.error_message();
  return info;
}

TEST(ServerTest, ModelInfoReportsThePrecisionOfSamplingAndScoring) {
  struct Case {
    const char* precision;
    const char* score_precision;
    const char* want_sample;
    const char* want_score;
  };
  for (const Case& c : {Case{"fp32", "fp32", "fp32", "fp32"},
                        Case{"bf16", "fp32", "bf16", "fp32"},
                        Case{"bf16", "same", "bf16", "bf16"}}) {
    VdmServer::Options options = TinyOptions();
    options.precision = c.precision;
    options.score_precision = c.score_precision;
    auto server = StartServer(options);
    ASSERT_NE(server, nullptr);
    auto stub = v1::VdmService::NewStub(grpc::CreateChannel(
        Target(*server), grpc::InsecureChannelCredentials()));
    const v1::ModelInfo info = Info(*stub);
    EXPECT_EQ(info.precision(), c.want_sample) << c.precision;
    EXPECT_EQ(info.score_precision(), c.want_score) << c.score_precision;
    EXPECT_TRUE(Sample(*stub, Request(2, 2)).ok()) << c.precision;
  }
}

TEST(ServerTest, ModelInfoReportsTheReplicaLayout) {
  VdmServer::Options options = TinyOptions();
  options.devices = {"cpu", "cpu"};
  options.threads = 0;  // the usable CPUs divided between the two
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  auto stub = v1::VdmService::NewStub(grpc::CreateChannel(
      Target(*server), grpc::InsecureChannelCredentials()));
  const v1::ModelInfo info = Info(*stub);
  EXPECT_EQ(info.replicas(), 2);
  EXPECT_EQ(info.threads_per_replica(),
            std::max(1, AvailableCpus().cpus / 2));
  EXPECT_EQ(info.device(), "cpu");
  // The two-replica server serves.
  EXPECT_TRUE(Sample(*stub, Request(2, 2)).ok());
}

TEST(ServerTest, ConstantTimeEqualsComparesWholeStrings) {
  EXPECT_TRUE(ConstantTimeEquals("abc", "abc"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abd"));
  EXPECT_FALSE(ConstantTimeEquals("abc", "abcd"));
  EXPECT_FALSE(ConstantTimeEquals("", "a"));
}

TEST(ServerTest, ServesOverTlsAndRequiresClientCertificatesWithMtls) {
  VdmServer::Options options = TinyOptions();
  options.tls_cert_file = TestData("tls/server.pem");
  options.tls_key_file = TestData("tls/server.key");
  options.tls_client_ca_file = TestData("tls/ca.pem");
  auto server = StartServer(options);
  ASSERT_NE(server, nullptr);
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = *ReadFile(TestData("tls/ca.pem"));
  grpc::SslCredentialsOptions with_cert = ssl;
  with_cert.pem_cert_chain = *ReadFile(TestData("tls/client.pem"));
  with_cert.pem_private_key = *ReadFile(TestData("tls/client.key"));

  auto good = v1::VdmService::NewStub(grpc::CreateChannel(
      "localhost:" + std::to_string(server->port()),
      grpc::SslCredentials(with_cert)));
  EXPECT_TRUE(Sample(*good, Request(1, 2)).ok());

  auto no_cert = v1::VdmService::NewStub(grpc::CreateChannel(
      "localhost:" + std::to_string(server->port()), grpc::SslCredentials(ssl)));
  EXPECT_FALSE(Sample(*no_cert, Request(1, 2)).ok());

  auto plaintext = v1::VdmService::NewStub(grpc::CreateChannel(
      Target(*server), grpc::InsecureChannelCredentials()));
  EXPECT_EQ(Sample(*plaintext, Request(1, 2)).error_code(),
            grpc::StatusCode::UNAVAILABLE);

  // The client library (vdm-client --tls_ca --tls_cert --tls_key): a TLS
  // health probe that works, and one without a client certificate that the
  // server refuses.
  client::ClientOptions tls;
  tls.target = "localhost:" + std::to_string(server->port());
  tls.tls_ca_file = TestData("tls/ca.pem");
  tls.tls_cert_file = TestData("tls/client.pem");
  tls.tls_key_file = TestData("tls/client.key");
  auto probe = client::VdmClient::Create(tls);
  ASSERT_TRUE(probe.ok()) << probe.status();
  auto health = (*probe)->CheckHealth();
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(*health, HealthResponse::SERVING);
  tls.tls_cert_file.clear();
  tls.tls_key_file.clear();
  EXPECT_FALSE((*client::VdmClient::Create(tls))->CheckHealth().ok());
  tls.tls_cert_file = TestData("tls/client.pem");
  EXPECT_EQ(client::VdmClient::Create(tls).status().code(),
            absl::StatusCode::kInvalidArgument)
      << "a certificate without its key";
}

TEST(ServerTest, TlsNeedsBothCertificateAndKey) {
  VdmServer::Options options = TinyOptions();
  options.tls_cert_file = TestData("tls/server.pem");
  auto server = VdmServer::Create(options);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("tls_key"));
}

TEST(ServerTest, MismatchedOrBrokenTlsFilesAreNamed) {
  VdmServer::Options options = TinyOptions();
  options.tls_cert_file = TestData("tls/server.pem");
  options.tls_key_file = TestData("tls/client.key");  // another pair's key
  auto server = VdmServer::Create(options);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(server.status().message()),
              HasSubstr("--tls_key does not match --tls_cert"));
  options.tls_key_file = TestData("tls/server.pem");  // a certificate, no key
  server = VdmServer::Create(options);
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("--tls_key"));
}

TEST(ServerTest, StreamsCancelledMidwayLeaveTheServerServing) {
  // A reader that goes away after its first message, many times: the
  // reactor finishes from whichever thread sees the end last (this once
  // aborted the server: Finish ran under the reactor's mutex and OnDone
  // deleted it at once).
  auto server = StartServer(TinyOptions());
  ASSERT_NE(server, nullptr);
  auto channel = grpc::CreateChannel(Target(*server),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::VdmService::NewStub(channel);
  for (int i = 0; i < 30; ++i) {
    v1::SampleRequest request = Request(2, 200);
    request.set_preview_every(1);
    grpc::ClientContext context;
    auto reader = stub->SampleStream(&context, request);
    v1::SampleStreamResponse message;
    EXPECT_TRUE(reader->Read(&message));
    context.TryCancel();
    while (reader->Read(&message)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  }
  EXPECT_EQ(Health(channel), HealthResponse::SERVING);
  EXPECT_TRUE(Sample(*stub, Request(1, 2)).ok());
}

TEST(ServerTest, SampleStreamSendsProgressPreviewsAndTheResult) {
  auto server = StartServer(TinyOptions());
  ASSERT_NE(server, nullptr);
  auto stub = v1::VdmService::NewStub(grpc::CreateChannel(
      Target(*server), grpc::InsecureChannelCredentials()));
  v1::SampleRequest request = Request(2, 12);
  request.set_preview_every(4);
  grpc::ClientContext context;
  auto reader = stub->SampleStream(&context, request);
  v1::SampleStreamResponse message;
  int last_step = 0, previews = 0, results = 0;
  while (reader->Read(&message)) {
    if (message.has_progress()) {
      EXPECT_GT(message.progress().step(), last_step);  // in order
      EXPECT_EQ(message.progress().total_steps(), 12);
      last_step = message.progress().step();
      if (message.progress().previews_size() > 0) {
        EXPECT_EQ(message.progress().previews_size(), 2);
        EXPECT_EQ(message.progress().step() % 4, 0);
        ++previews;
      }
    } else {
      ASSERT_TRUE(message.has_result());
      EXPECT_EQ(message.result().images_size(), 2);
      ++results;
    }
  }
  ASSERT_TRUE(reader->Finish().ok());
  EXPECT_EQ(last_step, 12);
  EXPECT_EQ(previews, 2);  // steps 4 and 8 (none at the final step)
  EXPECT_EQ(results, 1);
}

}  // namespace
}  // namespace vdm

namespace vdm {
namespace {

struct BadOption {
  std::function<void(VdmServer::Options&)> edit;
  const char* flag;
};

TEST(ServerOptionsTest, BadStartUpSettingsAreRefusedNamingTheFlag) {
  const std::vector<BadOption> cases = {
      {[](VdmServer::Options& o) { o.max_message_mb = 4096; }, "--max_message_mb"},
      {[](VdmServer::Options& o) { o.max_message_mb = 0; }, "--max_message_mb"},
      {[](VdmServer::Options& o) { o.engine.max_batch = 0; }, "--max_batch"},
      {[](VdmServer::Options& o) { o.engine.max_queued_rows = -5; }, "--max_queued_rows"},
      {[](VdmServer::Options& o) { o.limits.max_images_per_request = 0; },
       "--max_images_per_request"},
      {[](VdmServer::Options& o) { o.limits.max_steps = -1; }, "--max_steps"},
      {[](VdmServer::Options& o) { o.limits.max_timesteps = 1; }, "--max_timesteps"},
      {[](VdmServer::Options& o) { o.threads = -2; }, "--threads"},
      {[](VdmServer::Options& o) { o.address = "127.0.0.1:99999"; }, "--address"},
      {[](VdmServer::Options& o) { o.address = "127.0.0.1"; }, "--address"},
      {[](VdmServer::Options& o) { o.address = "::1:50051"; }, "--address"},
      {[](VdmServer::Options& o) { o.metrics_address = "localhost:http"; },
       "--metrics_address"},
      {[](VdmServer::Options& o) { o.devices.clear(); }, "--devices"},
      {[](VdmServer::Options& o) { o.devices = {"auto", "cpu"}; }, "--devices"},
      {[](VdmServer::Options& o) { o.precision = "fp16"; }, "--precision"},
      {[](VdmServer::Options& o) { o.score_precision = "bf16"; },
       "--score_precision"},
  };
  for (const BadOption& c : cases) {
    VdmServer::Options options = TinyOptions();
    c.edit(options);
    const absl::Status s = ValidateOptions(options);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.flag;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.flag));
    // Create refuses them before loading anything.
    EXPECT_EQ(VdmServer::Create(options).status().code(),
              absl::StatusCode::kInvalidArgument)
        << c.flag;
  }
  VdmServer::Options good = TinyOptions();
  EXPECT_TRUE(ValidateOptions(good).ok());
  good.address = "[::1]:0";
  good.metrics_address = "[::]:9090";
  EXPECT_TRUE(ValidateOptions(good).ok());
  good.address = "unix:/tmp/vdm.sock";
  EXPECT_TRUE(ValidateOptions(good).ok());
}

// --devices=auto and --threads=0 (vdm-server's defaults) resolved for a
// number of usable CPUs; explicit settings are kept.
TEST(ServerOptionsTest, AutoLayoutIsOneSingleThreadedCpuReplicaPerCpuUpToFour) {
  struct Case {
    std::vector<std::string> devices;
    int threads, cpus;
    std::vector<std::string> want_devices;
    int want_threads;
    int want_lone_threads;  // lone_threads -1 (automatic), lone_split off
  };
  const std::vector<std::string> cpu1 = {"cpu"}, cpu2 = {"cpu", "cpu"};
  const std::vector<std::string> cpu4 = {"cpu", "cpu", "cpu", "cpu"};
  const std::vector<Case> cases = {
      {{"auto"}, 0, 2, cpu2, 1, 2},     // this project's machines
      {{"auto"}, 0, 1, cpu1, 1, 0},     // one replica: nothing to lend
      {{"auto"}, 0, 0, cpu1, 1, 0},     // an unknown count counts as 1
      {{"auto"}, 0, 16, cpu4, 4, 16},   // capped at kMaxAutoCpuReplicas
      {{"auto"}, 0, 6, cpu4, 1, 6},     // 6 / 4 rounds down
      {{"auto"}, 3, 2, cpu2, 3, 0},     // explicit threads are kept
      {cpu1, 0, 8, cpu1, 8, 0},         // --devices=cpu: one replica, all CPUs
      {cpu2, 0, 2, cpu2, 1, 2},         // no oversubscription
      {{"cuda:0"}, 0, 8, {"cuda:0"}, 8, 0},
  };
  for (const Case& c : cases) {
    VdmServer::Options options = TinyOptions();
    options.devices = c.devices;
    options.threads = c.threads;
    options.lone_split = false;
    absl::StatusOr<VdmServer::Options> resolved = ResolveLayout(options, c.cpus);
    ASSERT_TRUE(resolved.ok()) << resolved.status();
    EXPECT_EQ(resolved->devices, c.want_devices) << c.cpus << " CPUs";
    EXPECT_EQ(resolved->threads, c.want_threads) << c.cpus << " CPUs";
    EXPECT_EQ(resolved->lone_threads, c.want_lone_threads) << c.cpus << " CPUs";
  }
  VdmServer::Options off = TinyOptions();
  off.devices = cpu2;
  off.lone_threads = 0;
  EXPECT_EQ(ResolveLayout(off, 2)->lone_threads, 0) << "0 = off is kept";
  VdmServer::Options split = TinyOptions();
  split.devices = {"auto"};
  ASSERT_TRUE(split.lone_split) << "the default";
  EXPECT_EQ(ResolveLayout(split, 2)->lone_threads, 0)
      << "the split already uses every replica";
  VdmServer::Options bad = TinyOptions();
  bad.devices = {"cpu", "auto"};
  EXPECT_EQ(ResolveLayout(bad, 2).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace vdm
