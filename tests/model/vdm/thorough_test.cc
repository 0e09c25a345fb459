// The thorough anomaly level's calibration (model/vdm/thorough.h): the tail
// arithmetic, the kNN distance, Fisher's combination finding an image that
// is far out on one group only, p-values that keep their rate on
// calibration-like data, and the calibration file's section round trip
// with errors that name what is wrong.
#include "model/vdm/thorough.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/vdm/calibration_file.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

using ::testing::HasSubstr;

constexpr int kDim = 3;  // embedding size of the synthetic images

TEST(ThoroughTailTest, LogUpperTailMatchesErfcAndStaysFiniteFarOut) {
  for (double z : {-3.0, -1.0, 0.0, 1.0, 2.5, 4.9, 12.0, 29.0}) {
    EXPECT_NEAR(LogUpperTail(z), std::log(0.5 * std::erfc(z / std::sqrt(2.0))),
                1e-12)
        << z;
  }
  // The asymptotic branch joins the exact one at z = 30 (about -454.3).
  const double exact30 = std::log(0.5 * std::erfc(30.0 / std::sqrt(2.0)));
  EXPECT_NEAR(LogUpperTail(30.0), exact30, 1e-6);
  EXPECT_TRUE(std::isfinite(LogUpperTail(60.0)));  // erfc underflows there
  EXPECT_LT(LogUpperTail(60.0), LogUpperTail(40.0));
  EXPECT_NEAR(LogUpperTail(60.0), -1800.0 - std::log(60.0 * std::sqrt(2 * M_PI)),
              1e-3);
}

TEST(ThoroughTailTest, ChiSquaredZIsAboutNormalForChiSquaredValues) {
  // The mean of chi-squared(d) is d; Wilson-Hilferty puts it near z = 0, and
  // the 97.5% point (d = 4: 11.143) near 1.96.
  EXPECT_NEAR(ChiSquaredZ(4.0, 4.0), 0.0, 0.25);
  EXPECT_NEAR(ChiSquaredZ(11.143, 4.0), 1.96, 0.05);
  EXPECT_NEAR(ChiSquaredZ(5.024, 1.0), 1.96, 0.1);
  EXPECT_TRUE(std::isnan(ChiSquaredZ(-1.0, 3.0)));
}

// A synthetic image: fast features, an embedding and 4 probe features, each
// group drawn around its own mean; `shift[g]` moves group g.
ImageLikelihood Synthetic(std::mt19937_64& gen, const std::vector<double>& shift) {
  std::normal_distribution<double> n(0.0, 1.0);
  ImageLikelihood im;
  im.complexity = 3.0;
  im.bpd = 5.0 + 0.1 * n(gen) + shift[0];
  for (int b = 0; b < kBands; ++b) im.band.push_back(0.5 + 0.05 * n(gen));
  ThoroughFeatures t;
  for (int j = 0; j < kDim; ++j) {
    t.embedding.push_back(static_cast<float>(n(gen) + shift[1]));
  }
  for (int j = 0; j < 4; ++j) {
    t.recon_error.push_back(std::exp(-2.0 + 0.2 * n(gen) + shift[2]));
    t.recon_distance.push_back(std::exp(0.1 * n(gen) + shift[3]));
  }
  im.thorough = t;
  return im;
}

struct Fitted {
  ThoroughCalibration calibration;
  std::mt19937_64 gen;
};

Fitted FitSynthetic(int n = 400, uint64_t seed = 5) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> reference;
  for (int r = 0; r < 300 * kDim; ++r) {
    reference.push_back(static_cast<float>(normal(gen)));
  }
  std::vector<ImageLikelihood> images;
  for (int i = 0; i < n; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0}));
  ThoroughSetup setup;
  setup.elbo.timesteps = 8;
  auto fit = ThoroughCalibration::Fit(images, reference, kDim, setup);
  EXPECT_TRUE(fit.ok()) << fit.status();
  return {*std::move(fit), gen};
}

TEST(ThoroughCalibrationTest, KnnDistanceIsTheMeanOfTheKNearest) {
  // Reference points at 0, 1, 2, ..., 9 on the first axis; k = 3 from 0.2:
  // 0.2, 0.8 and 1.8, mean 0.9333.
  std::vector<float> reference;
  for (int r = 0; r < 10; ++r) {
    reference.insert(reference.end(), {static_cast<float>(r), 0.f, 0.f});
  }
  std::mt19937_64 gen(1);
  std::vector<ImageLikelihood> images;
  for (int i = 0; i < 20; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0}));
  ThoroughSetup setup;
  setup.knn_k = 3;
  auto c = ThoroughCalibration::Fit(images, reference, 3, setup);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NEAR(c->KnnDistance({0.2f, 0.f, 0.f}), (0.2 + 0.8 + 1.8) / 3, 1e-6);
  EXPECT_TRUE(std::isnan(c->KnnDistance({0.f, 0.f})));  // wrong dimension
}

TEST(ThoroughCalibrationTest, OneGroupFarOutIsEnough) {
  Fitted f = FitSynthetic();
  const ImageLikelihood typical = Synthetic(f.gen, {0, 0, 0, 0});
  const double typical_score = f.calibration.Score(typical);
  EXPECT_GT(f.calibration.PValue(typical_score), 0.02);
  // Each group alone moved by a few of its own spreads: flagged at 1%.
  const std::vector<std::vector<double>> moves = {
      {1.0, 0, 0, 0}, {0, 4.0, 0, 0}, {0, 0, 1.5, 0}, {0, 0, 0, 0.8}};
  for (size_t g = 0; g < moves.size(); ++g) {
    const ImageLikelihood odd = Synthetic(f.gen, moves[g]);
    const std::vector<double> z = f.calibration.GroupZ(odd);
    EXPECT_GT(z[g], 4.0) << ThoroughCalibration::GroupName(g);
    const double score = f.calibration.Score(odd);
    EXPECT_LE(f.calibration.PValue(score), 0.01) << ThoroughCalibration::GroupName(g);
  }
  // Too typical counts too (two-sided): a recon error far *below* the data.
  const ImageLikelihood too_good = Synthetic(f.gen, {0, 0, -1.5, 0});
  EXPECT_GT(f.calibration.GroupZ(too_good)[2], 4.0);
  // Nearer to the training images than usual is typical: the kNN group is
  // one-sided.
  // (The reference is standard normal: its points are densest at the origin.)
  ImageLikelihood near = Synthetic(f.gen, {0, 0, 0, 0});
  near.thorough->embedding = {0.f, 0.f, 0.f};
  EXPECT_LT(f.calibration.GroupZ(near)[1], -1.0);
  EXPECT_GT(f.calibration.PValue(f.calibration.Score(near)), 0.02);
  // A missing feature scores as far out as possible.
  ImageLikelihood broken = typical;
  broken.thorough->recon_error.pop_back();
  EXPECT_EQ(f.calibration.PValue(f.calibration.Score(broken)),
            1.0 / (f.calibration.size() + 1.0));
}

TEST(ThoroughCalibrationTest, PValuesKeepTheirRateOnCalibrationLikeImages) {
  Fitted f = FitSynthetic();
  // 2,000 fresh images from the calibration's distribution: the flagged
  // fraction at 5% is 5% up to the sampling error of 400 calibration images
  // and 2,000 draws (sd about 1.1% and 0.5%; allow 3 of the larger).
  int flagged = 0;
  const int n = 2000;
  for (int i = 0; i < n; ++i) {
    const ImageLikelihood im = Synthetic(f.gen, {0, 0, 0, 0});
    flagged += f.calibration.PValue(f.calibration.Score(im)) <= 0.05;
  }
  EXPECT_NEAR(static_cast<double>(flagged) / n, 0.05, 0.033);
}

TEST(ThoroughCalibrationTest, ThePolicyUsesItOnlyAtTheThoroughLevel) {
  Fitted f = FitSynthetic();
  const ImageLikelihood odd = Synthetic(f.gen, {0, 4.0, 0, 0});
  AnomalyRequest request;
  request.timesteps = 8;
  request.level = AnomalyLevel::kThorough;
  const BatchAnomaly a = ScoreAnomalies({odd, odd}, nullptr, request, &f.calibration);
  ASSERT_TRUE(a.images[0].is_anomaly.has_value());
  EXPECT_TRUE(*a.images[0].is_anomaly);
  ASSERT_TRUE(a.images[0].feature_distance.has_value());
  EXPECT_NEAR(*a.images[0].feature_distance,
              f.calibration.KnnDistance(odd.thorough->embedding), 1e-12);
  EXPECT_NEAR(*a.images[0].reconstruction_error,
              (odd.thorough->recon_error[0] + odd.thorough->recon_error[1] +
               odd.thorough->recon_error[2] + odd.thorough->recon_error[3]) / 4,
              1e-12);
  EXPECT_TRUE(a.batch_p_value.has_value());
  // The fast level, or another K: not this calibration.
  request.level = AnomalyLevel::kFast;
  EXPECT_FALSE(ScoreAnomalies({odd}, nullptr, request, &f.calibration)
                   .images[0].feature_distance.has_value());
  request.level = AnomalyLevel::kThorough;
  request.timesteps = 16;
  const BatchAnomaly other = ScoreAnomalies({odd}, nullptr, request, &f.calibration);
  EXPECT_FALSE(other.images[0].p_value.has_value());
  EXPECT_FALSE(other.images[0].feature_distance.has_value());
}

TEST(ThoroughCalibrationTest, FitRefusesTooFewImagesAndMissingFeatures) {
  std::mt19937_64 gen(2);
  std::vector<float> reference(30 * kDim, 0.5f);
  std::vector<ImageLikelihood> images;
  for (int i = 0; i < 5; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0}));
  ThoroughSetup setup;
  auto few = ThoroughCalibration::Fit(images, reference, kDim, setup);
  EXPECT_THAT(std::string(few.status().message()), HasSubstr("group fast"));
  for (int i = 0; i < 20; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0}));
  images.back().thorough.reset();
  auto missing = ThoroughCalibration::Fit(images, reference, kDim, setup);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("lacks its thorough features"));
  images.pop_back();
  setup.knn_k = 30;
  auto k = ThoroughCalibration::Fit(images, reference, kDim, setup);
  EXPECT_THAT(std::string(k.status().message()), HasSubstr("knn_k"));
}

TEST(ThoroughCalibrationTest, TheFileSectionRoundTripsAndNamesItsErrors) {
  Fitted f = FitSynthetic(60);
  CalibrationFile file;
  file.thorough = std::make_shared<const ThoroughCalibration>(f.calibration);
  const std::string text = CalibrationFileToJson(file);
  auto back = ParseCalibrationFile(text);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_NE(back->thorough, nullptr);
  EXPECT_EQ(back->anomaly, nullptr);
  EXPECT_EQ(back->thorough->reference_size(), 300);
  EXPECT_EQ(back->thorough->size(), 60u);
  for (int i = 0; i < 5; ++i) {
    const ImageLikelihood im = Synthetic(f.gen, {0, 0.5 * i, 0, 0});
    EXPECT_DOUBLE_EQ(back->thorough->Score(im), f.calibration.Score(im));
  }
  // Damaged sections: the error names the section and the part.
  nlohmann::json j = nlohmann::json::parse(text);
  nlohmann::json bad = j;
  bad["anomaly"]["thorough"]["reference"]["float32_le_base64"] = "!!!";
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("anomaly.thorough: reference"));
  bad = j;
  bad["anomaly"]["thorough"]["groups"].erase("knn");
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("no group knn"));
  bad = j;
  bad["anomaly"]["thorough"]["probe_times"] = {0.5, 1.5};
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("probe_times"));
  bad = j;
  bad["anomaly"]["thorough"]["time_proposal"] = true;
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("no time_proposal section"));
}

}  // namespace
}  // namespace vdm
