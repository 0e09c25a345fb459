// A VdmServer on a model repository (server/model_repository.h) of the
// tiny exported models: two models routed by name, each with its own
// calibration; ListModels and per-model metrics; and a version swap under
// load with no failed request, every response from one complete version,
// then a broken version refused while the served one keeps serving.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/image_io.h"
#include "server/server.h"
#include "vdm/v1/vdm.grpc.pb.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string TestModel(const std::string& name) {
  return std::string(VDM_TEST_MODELS_DIR) + "/" + name + ".pt";
}

// Copies `from` to DIR/NAME/VERSION/model.pt the way a deployment should:
// into a hidden folder first, then renamed into place, so a scan never sees
// half a file.
void Publish(const fs::path& root, const std::string& name, int version,
             const std::string& from) {
  const fs::path staging = root / name / ("." + std::to_string(version));
  fs::create_directories(staging);
  fs::copy_file(from, staging / "model.pt", fs::copy_options::overwrite_existing);
  fs::rename(staging, root / name / std::to_string(version));
}

class RepositoryServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = fs::path(::testing::TempDir()) /
            (std::string("repo_") +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(root_);
    fs::create_directories(root_);
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(root_);
  }

  void Start() {
    VdmServer::Options o;
    o.model_repository = root_.string();
    o.address = "127.0.0.1:0";
    o.threads = 1;
    o.engine.max_batch = 32;
    o.repository_poll_seconds = 0;  // the test syncs itself
    auto server = VdmServer::Create(o);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    stub_ = v1::VdmService::NewStub(grpc::CreateChannel(
        "127.0.0.1:" + std::to_string(server_->port()),
        grpc::InsecureChannelCredentials()));
  }

  static v1::SampleRequest Request(const std::string& model) {
    v1::SampleRequest r;
    r.set_model(model);
    r.set_num_images(2);
    r.set_steps(4);
    r.set_seed(5);
    r.set_format(v1::IMAGE_FORMAT_RAW);
    return r;
  }
  grpc::Status Sample(const v1::SampleRequest& r, v1::SampleResponse* out) {
    grpc::ClientContext context;
    return stub_->Sample(&context, r, out);
  }
  v1::ListModelsResponse List() {
    grpc::ClientContext context;
    v1::ListModelsResponse list;
    EXPECT_TRUE(stub_->ListModels(&context, {}, &list).ok());
    return list;
  }
  static std::string Pixels(const v1::SampleResponse& r) {
    std::string all;
    for (const v1::Image& image : r.images()) all += image.data();
    return all;
  }

  fs::path root_;
  std::unique_ptr<VdmServer> server_;
  std::unique_ptr<v1::VdmService::Stub> stub_;
};

// The largest per-pixel difference of two equally long RAW payloads.
int MaxDifference(const std::string& a, const std::string& b) {
  EXPECT_EQ(a.size(), b.size());
  int worst = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    worst = std::max(worst, std::abs(static_cast<int>(static_cast<uint8_t>(a[i])) -
                                     static_cast<int>(static_cast<uint8_t>(b[i]))));
  }
  return worst;
}

TEST_F(RepositoryServerTest, TwoModelsAreRoutedByNameWithTheirOwnCalibration) {
  Publish(root_, "tiny", 1, TestModel("tiny"));
  Publish(root_, "uncond", 3, TestModel("tiny_uncond_v"));
  // A calibration for tiny only (5 features: bpd - complexity and 4 bands).
  std::mt19937 gen(1);
  std::normal_distribution<double> normal;
  std::vector<std::vector<double>> features(40, std::vector<double>(5));
  for (auto& f : features) {
    for (double& x : f) x = normal(gen);
  }
  Calibration::Setup setup;
  setup.timesteps = 8;
  ASSERT_TRUE(WriteFileAtomic((root_ / "tiny/1/model.pt.calibration.json").string(),
                              Calibration::Fit(features, setup)->ToJson())
                  .ok());
  Start();

  v1::SampleResponse tiny, uncond, by_default;
  ASSERT_TRUE(Sample(Request("tiny"), &tiny).ok());
  ASSERT_TRUE(Sample(Request("uncond"), &uncond).ok());
  ASSERT_TRUE(Sample(Request(""), &by_default).ok());
  EXPECT_EQ(tiny.model(), "tiny");
  EXPECT_EQ(tiny.model_version(), 1);
  EXPECT_EQ(uncond.model(), "uncond");
  EXPECT_EQ(uncond.model_version(), 3);
  EXPECT_EQ(by_default.model(), "tiny") << "the default is the first by name";
  EXPECT_EQ(Pixels(by_default), Pixels(tiny));
  EXPECT_GT(MaxDifference(Pixels(tiny), Pixels(uncond)), 10)
      << "two different networks";

  for (const auto& [name, classes, calibrated] :
       {std::tuple<std::string, int, bool>{"tiny", 10, true},
        {"uncond", 0, false}}) {
    grpc::ClientContext context;
    v1::ModelInfoRequest request;
    request.set_model(name);
    v1::ModelInfo info;
    ASSERT_TRUE(stub_->GetModelInfo(&context, request, &info).ok());
    EXPECT_EQ(info.model_name(), name);
    EXPECT_EQ(info.num_classes(), classes);
    EXPECT_EQ(info.calibrated(), calibrated) << name;
    EXPECT_GT(info.memory_bytes(), 10000) << "its parameters, in bytes";
    EXPECT_EQ(info.is_default(), name == "tiny");
  }

  v1::SampleResponse none;
  const grpc::Status missing = Sample(Request("nope"), &none);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(missing.error_message(), HasSubstr("serving: tiny, uncond"));
  v1::SampleRequest old = Request("uncond");
  old.set_version(2);
  EXPECT_EQ(Sample(old, &none).error_code(), grpc::StatusCode::NOT_FOUND);

  const v1::ListModelsResponse list = List();
  ASSERT_EQ(list.models_size(), 2);
  EXPECT_EQ(list.default_model(), "tiny");
  EXPECT_EQ(list.models(0).name(), "tiny");
  EXPECT_EQ(list.models(0).state(), v1::ModelVersionStatus::READY);
  EXPECT_EQ(list.models(1).name(), "uncond");
  EXPECT_EQ(list.models(1).version(), 3);

  const std::string metrics = server_->metrics().Scrape();
  EXPECT_THAT(metrics, HasSubstr("vdm_model_state{model=\"uncond\",state=\"ready\",version=\"3\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("vdm_model_requests_total{code=\"OK\",method=\"Sample\",model=\"tiny\",version=\"1\"} 2"));
  EXPECT_THAT(metrics, HasSubstr("vdm_model_rows_total{model=\"uncond\",version=\"3\"} 8"));
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("model=\"nope\"")))
      << "names from requests never become labels";
}

TEST_F(RepositoryServerTest, AVersionSwapUnderLoadFailsNoRequestAndMixesNoModels) {
  Publish(root_, "tiny", 1, TestModel("tiny"));
  Start();
  v1::SampleResponse first;
  ASSERT_TRUE(Sample(Request("tiny"), &first).ok());
  const std::string v1_pixels = Pixels(first);

  // Three callers send the same request back to back until told to stop:
  // two by Sample, one by SampleStream (its progress messages and result
  // from one version too).
  struct Answer {
    grpc::Status status;
    int64_t version;
    std::string pixels;
  };
  absl::Mutex mu;
  std::vector<std::vector<Answer>> answers(3);
  int on_v2 = 0, total = 0;
  std::atomic<bool> stop{false};
  std::vector<std::thread> callers;
  for (int c = 0; c < 3; ++c) {
    callers.emplace_back([&, c] {
      while (!stop) {
        v1::SampleResponse r;
        grpc::Status s;
        if (c == 2) {
          grpc::ClientContext context;
          auto stream = stub_->SampleStream(&context, Request("tiny"));
          v1::SampleStreamResponse message;
          // Plain progress messages that wait behind a slow reader are
          // coalesced (sample_stream.cc): of the 4 steps' messages at least
          // the last arrives, in order, and before the result.
          int progress = 0, last_step = 0;
          bool in_order = true, result_last = true, got_result = false;
          while (stream->Read(&message)) {
            if (message.has_result()) {
              r = message.result();
              got_result = true;
            }
            if (message.has_progress()) {
              ++progress;
              in_order = in_order && message.progress().step() > last_step;
              last_step = message.progress().step();
              result_last = result_last && !got_result;
            }
          }
          s = stream->Finish();
          if (s.ok() && (progress < 1 || progress > 4 || !in_order ||
                         last_step != 4 || !result_last)) {
            s = grpc::Status(
                grpc::StatusCode::INTERNAL,
                absl::StrCat("progress messages: ", progress, ", last step ",
                             last_step, in_order ? "" : ", out of order",
                             result_last ? "" : ", after the result"));
          }
        } else {
          s = Sample(Request("tiny"), &r);
        }
        absl::MutexLock lock(&mu);
        answers[c].push_back({s, r.model_version(), Pixels(r)});
        ++total;
        if (r.model_version() == 2) ++on_v2;
      }
    });
  }
  // Blocks until *counter >= n (the callers count under mu).
  const auto at_least = [&](int* counter, int n) {
    std::pair<int*, int> want(counter, n);
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](std::pair<int*, int>* a) { return *a->first >= a->second; },
        &want));
  };
  at_least(&total, 6);  // under load
  Publish(root_, "tiny", 2, TestModel("tiny_learned"));
  ASSERT_TRUE(server_->repository().Sync().ok());  // loaded, warmed, swapped
  at_least(&on_v2, 6);  // and on the new version for a while
  stop = true;
  for (std::thread& t : callers) t.join();

  std::string v2_pixels;
  int on_v1 = 0;
  for (const std::vector<Answer>& caller : answers) {
    int64_t last = 0;
    for (const Answer& a : caller) {
      ASSERT_TRUE(a.status.ok()) << a.status.error_message();
      ASSERT_TRUE(a.version == 1 || a.version == 2) << a.version;
      EXPECT_GE(a.version, last) << "once on the new version, always";
      last = a.version;
      if (a.version == 1) {
        ++on_v1;
        EXPECT_LE(MaxDifference(a.pixels, v1_pixels), 2)
            << "a version-1 answer is version 1's images";
      } else {
        if (v2_pixels.empty()) v2_pixels = a.pixels;
        EXPECT_LE(MaxDifference(a.pixels, v2_pixels), 2)
            << "every version-2 answer is version 2's images";
      }
    }
  }
  EXPECT_GE(on_v1, 6);
  EXPECT_GT(MaxDifference(v1_pixels, v2_pixels), 4)
      << "the versions are different networks, so a mix would show";
  // The old version's requests are done (and their callbacks, which held
  // it): it has left the list.
  ASSERT_TRUE(server_->engine().WaitIdle(absl::Now() + absl::Seconds(60)));
  const v1::ListModelsResponse list = List();
  ASSERT_EQ(list.models_size(), 1);
  EXPECT_EQ(list.models(0).version(), 2);
  EXPECT_EQ(list.models(0).state(), v1::ModelVersionStatus::READY);

  // A broken version 3 is refused; version 2 keeps serving.
  Publish(root_, "tiny", 3, TestModel("broken_nan_output"));
  const absl::Status refused = server_->repository().Sync();
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.message()), HasSubstr("tiny version 3"));
  v1::SampleResponse after;
  ASSERT_TRUE(Sample(Request("tiny"), &after).ok());
  EXPECT_EQ(after.model_version(), 2);
  const v1::ListModelsResponse listed = List();
  ASSERT_EQ(listed.models_size(), 2);
  EXPECT_EQ(listed.models(0).version(), 2);
  EXPECT_EQ(listed.models(0).state(), v1::ModelVersionStatus::READY);
  EXPECT_EQ(listed.models(1).version(), 3);
  EXPECT_EQ(listed.models(1).state(), v1::ModelVersionStatus::FAILED);
  EXPECT_FALSE(listed.models(1).error().empty());
  const std::string metrics = server_->metrics().Scrape();
  EXPECT_THAT(metrics, HasSubstr("vdm_model_load_failures_total{model=\"tiny\"} 1"));
  EXPECT_THAT(metrics, HasSubstr("vdm_model_state{model=\"tiny\",state=\"failed\",version=\"3\"} 1"));
  EXPECT_THAT(metrics, ::testing::Not(HasSubstr("version=\"1\"")))
      << "the unloaded version's series are gone";
}

}  // namespace
}  // namespace vdm
