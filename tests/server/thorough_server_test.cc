// The thorough anomaly level end to end (docs/anomaly.md, "The thorough
// level"): a tiny model with a feature network and a thorough calibration
// fitted as vdm-calibrate fits it (ScoreSet, the server's own scoring),
// then ScoreBPD at ANOMALY_LEVEL_THOROUGH through the real server: the cost,
// the fields, the calibrated flags, the map, the CSV, and the refusals.
#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "client/client.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/image_io.h"
#include "model/vdm/local_match.h"
#include "model/vdm/tensor_image.h"
#include "model/vdm/thorough.h"
#include "model/vdm/torchscript_model.h"
#include "server/server.h"
#include "tools/anomaly_scoring.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

const std::string kModels = VDM_TEST_MODELS_DIR;
constexpr int kTimesteps = 8;

// Calibration-like images: stripes of a few widths and phases.
std::vector<Image8> Striped(int n, int offset = 0) {
  std::vector<Image8> images;
  for (int i = offset; i < offset + n; ++i) {
    Image8 im{1, 28, 28, std::vector<uint8_t>(28 * 28)};
    for (int p = 0; p < 28 * 28; ++p) {
      im.pixels[p] = static_cast<uint8_t>((p * (i % 7 + 2) + i) % 200);
    }
    images.push_back(im);
  }
  return images;
}

VdmServer::Options Options(const std::string& calibration) {
  VdmServer::Options o;
  o.model_path = kModels + "/tiny.pt";
  o.feature_model_path = kModels + "/tiny_features.pt";
  o.calibration_path = calibration;
  o.address = "127.0.0.1:0";
  o.metrics_address = "";
  o.threads = 1;
  o.limits.max_images_per_request = 32;
  return o;
}

std::unique_ptr<client::VdmClient> ClientOf(const VdmServer& server) {
  return std::make_unique<client::VdmClient>(
      grpc::CreateChannel("127.0.0.1:" + std::to_string(server.port()),
                          grpc::InsecureChannelCredentials()),
      client::ClientOptions{});
}

class ThoroughServerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // Fitted as vdm-calibrate fits it: 48 images scored by ScoreSet with
    // the thorough probes and the feature network, the kNN reference the
    // features of 40 other images.
    auto model = TorchScriptModel::Load({kModels + "/tiny.pt"});
    ASSERT_TRUE(model.ok()) << model.status();
    auto features = FeatureModel::Load(kModels + "/tiny_features.pt");
    ASSERT_TRUE(features.ok()) << features.status();
    ThoroughSetup setup;
    setup.elbo.timesteps = kTimesteps;
    setup.local_neighbours = 5;
    auto reference = MakeFeatureReference(
        **features, *ToTensor(Striped(40, 100), {1, 28, 28}));
    ASSERT_TRUE(reference.ok()) << reference.status();
    const auto shared = std::make_shared<const FeatureReference>(*reference);
    SetScoring scoring;
    scoring.timesteps = kTimesteps;
    scoring.seed = 1;
    scoring.thorough = setup;
    scoring.feature_model = features->get();
    scoring.reference = shared.get();
    auto scored = ScoreSet(**model, ToTensor(Striped(48), {1, 28, 28}).value(),
                           scoring);
    ASSERT_TRUE(scored.ok()) << scored.status();
    const std::vector<ImageLikelihood> likelihoods(scored->begin(), scored->end());
    auto fit = ThoroughCalibration::Fit(likelihoods, shared, setup);
    ASSERT_TRUE(fit.ok()) << fit.status();
    CalibrationFile file;
    file.thorough = std::make_shared<const ThoroughCalibration>(*fit);
    path_ = new std::string(::testing::TempDir() + "/tiny.thorough.calibration.json");
    ASSERT_TRUE(WriteFileAtomic(*path_, CalibrationFileToJson(file)).ok());
  }
  static void TearDownTestSuite() { delete path_; }

  static std::string* path_;
};
std::string* ThoroughServerTest::path_ = nullptr;

TEST_F(ThoroughServerTest, ScoresCostTheProbesAndFlagAFarImage) {
  auto server = VdmServer::Create(Options(*path_));
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = ClientOf(**server);
  auto info = client->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->thorough_available());
  EXPECT_EQ(info->thorough_evaluations_per_image(), kTimesteps + 8);
  EXPECT_THAT(info->feature_model_path(), HasSubstr("tiny_features.pt"));

  std::vector<Image8> probe = Striped(3, 7);
  probe.push_back({1, 28, 28, std::vector<uint8_t>(28 * 28, 255)});  // flat
  client::ScoreParams params;
  params.timesteps = kTimesteps;
  params.seed = 5;
  params.false_positive_rate = 0.05f;
  params.anomaly_map = true;
  params.anomaly_level = v1::ANOMALY_LEVEL_THOROUGH;
  auto scored = client->ScoreImages(client::RawInput(probe), params);
  ASSERT_TRUE(scored.ok()) << scored.status();
  EXPECT_EQ(scored->network_evaluations, 4 * (kTimesteps + 8));
  for (const auto& row : scored->rows) {
    ASSERT_TRUE(row.score.has_p_value());
    EXPECT_EQ(row.score.is_anomaly(), row.score.p_value() <= 0.05);
    ASSERT_TRUE(row.score.has_feature_distance());
    ASSERT_TRUE(row.score.has_reconstruction_error());
    EXPECT_GT(row.score.reconstruction_error(), 0.0);
    ASSERT_TRUE(row.score.has_local_distance());
    EXPECT_GE(row.score.local_distance(), 0.0);
    EXPECT_EQ(row.score.anomaly_map_size(), 28 * 28);
  }
  EXPECT_TRUE(scored->rows[3].score.is_anomaly()) << "the flat image";
  EXPECT_EQ(scored->rows[3].score.p_value(), 1.0 / 49);
  EXPECT_GT(scored->rows[0].score.p_value(), scored->rows[3].score.p_value());
  // The features do not depend on the request's seed (shared probe noise;
  // the ELBO's noise does): the same image, another seed, the same
  // reconstruction error and feature distance.
  params.seed = 6;
  auto again = client->ScoreImages(client::RawInput(probe), params);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->rows[1].score.reconstruction_error(),
            scored->rows[1].score.reconstruction_error());
  EXPECT_EQ(again->rows[1].score.feature_distance(),
            scored->rows[1].score.feature_distance());
  // The CSV gains the level's columns.
  EXPECT_THAT(client::FormatScoresCsv(scored->rows),
              HasSubstr(",feature_distance,reconstruction_error,local_distance"));
  // The map is the local match map, not the diffusion term's.
  params.anomaly_level = v1::ANOMALY_LEVEL_FAST;
  auto fast = client->ScoreImages(client::RawInput(probe), params);
  ASSERT_TRUE(fast.ok());
  EXPECT_EQ(fast->network_evaluations, 4 * kTimesteps);
  EXPECT_FALSE(fast->rows[0].score.has_feature_distance());
  EXPECT_NE(std::vector<float>(fast->rows[0].score.anomaly_map().begin(),
                               fast->rows[0].score.anomaly_map().end()),
            std::vector<float>(scored->rows[0].score.anomaly_map().begin(),
                               scored->rows[0].score.anomaly_map().end()));
  EXPECT_THAT(client::FormatScoresCsv(fast->rows),
              ::testing::Not(HasSubstr("feature_distance")));
}

TEST_F(ThoroughServerTest, ItIsRefusedWhereItCannotBeServed) {
  // No thorough calibration: FAILED_PRECONDITION naming what is missing.
  auto server = VdmServer::Create(Options("none"));
  ASSERT_TRUE(server.ok()) << server.status();
  auto client = ClientOf(**server);
  auto info = client->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_FALSE(info->thorough_available());
  client::ScoreParams params;
  params.anomaly_level = v1::ANOMALY_LEVEL_THOROUGH;
  auto refused = client->ScoreImages(client::RawInput(Striped(1)), params);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("anomaly.thorough"));
  // With it, the ODE and unknown levels are refused as bad arguments.
  auto calibrated = VdmServer::Create(Options(*path_));
  ASSERT_TRUE(calibrated.ok());
  auto c = ClientOf(**calibrated);
  params.method = v1::SCORE_METHOD_ODE;
  auto ode = c->ScoreImages(client::RawInput(Striped(1)), params);
  EXPECT_EQ(ode.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(ode.status().message()), HasSubstr("method ELBO only"));
  params.method = v1::SCORE_METHOD_UNSPECIFIED;
  params.anomaly_level = static_cast<v1::AnomalyLevel>(9);
  auto unknown = c->ScoreImages(client::RawInput(Striped(1)), params);
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("anomaly_level"));
}

TEST_F(ThoroughServerTest, AFeatureModelThatDoesNotFitIsRefusedAtStartUp) {
  VdmServer::Options o = Options(*path_);
  o.feature_model_path = kModels + "/tiny.pt";  // a VDM, no features()
  auto bad = VdmServer::Create(o);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("no features(f) method"));
  // A feature network exported before the local group: refused, saying how
  // to re-export it.
  o.feature_model_path = kModels + "/tiny_features_no_local.pt";
  auto old = VdmServer::Create(o);
  ASSERT_FALSE(old.ok());
  EXPECT_THAT(std::string(old.status().message()), HasSubstr("no local_features(f)"));
  EXPECT_THAT(std::string(old.status().message()), HasSubstr("--reexport"));
}

}  // namespace
}  // namespace vdm
