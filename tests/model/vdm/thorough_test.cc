// The thorough anomaly level's calibration (model/vdm/thorough.h): the tail
// arithmetic, the kNN distance and neighbours, Fisher's combination over
// the groups the calibration names finding an image that is far out on one
// group only, p-values that keep their rate on
// calibration-like data, and the calibration file's section round trip
// with errors that name what is wrong.
#include "model/vdm/thorough.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
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

// A synthetic image: fast features, an embedding, 4 probe features and a
// 3 x 3 local map, each group drawn around its own mean; `shift[g]` moves
// group g.
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
  for (int j = 0; j < 9; ++j) {
    t.local_map.push_back(static_cast<float>(std::exp(0.1 * n(gen) + shift[4])));
  }
  t.local_height = t.local_width = 3;
  im.thorough = t;
  return im;
}

// A reference of `embeddings` (kDim each) with a 1 x 1 x 1 image per row.
std::shared_ptr<const FeatureReference> Reference(std::vector<float> embeddings,
                                                  int64_t dim = kDim) {
  const size_t rows = embeddings.size() / dim;
  auto r = FeatureReference::Create(std::move(embeddings), dim,
                                    std::vector<uint8_t>(rows, 7), 1, 1, 1);
  EXPECT_TRUE(r.ok()) << r.status();
  return std::make_shared<const FeatureReference>(*std::move(r));
}

struct Fitted {
  ThoroughCalibration calibration;
  std::mt19937_64 gen;
};

Fitted FitSynthetic(int n = 400, uint64_t seed = 5,
                    std::vector<std::string> combined = {
                        "fast", "knn", "recon_error", "recon_distance", "local"}) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<float> reference;
  for (int r = 0; r < 300 * kDim; ++r) {
    reference.push_back(static_cast<float>(normal(gen)));
  }
  std::vector<ImageLikelihood> images;
  for (int i = 0; i < n; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0, 0}));
  ThoroughSetup setup;
  setup.elbo.timesteps = 8;
  setup.local_top = 3;
  setup.combined = std::move(combined);
  auto fit = ThoroughCalibration::Fit(images, Reference(reference), setup);
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
  for (int i = 0; i < 20; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0, 0}));
  ThoroughSetup setup;
  setup.knn_k = 3;
  auto c = ThoroughCalibration::Fit(images, Reference(reference, 3), setup);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_NEAR(c->KnnDistance({0.2f, 0.f, 0.f}), (0.2 + 0.8 + 1.8) / 3, 1e-6);
  EXPECT_TRUE(std::isnan(c->KnnDistance({0.f, 0.f})));  // wrong dimension
  // The neighbours the local group matches against, nearest first.
  const std::vector<Neighbour> near = c->reference()->Nearest({6.9f, 0.f, 0.f}, 4);
  ASSERT_EQ(near.size(), 4u);
  EXPECT_EQ(near[0].index, 7);
  EXPECT_NEAR(near[0].distance, 0.1, 1e-6);
  EXPECT_EQ(near[1].index, 6);
  EXPECT_EQ(near[2].index, 8);
  EXPECT_EQ(near[3].index, 5);
  EXPECT_EQ(c->reference()->Nearest({1.f, 0.f, 0.f}, 50).size(), 10u);
}

TEST(ThoroughCalibrationTest, LocalMapFeatureAveragesTheLargestCells) {
  EXPECT_NEAR(LocalMapFeature({1.f, 5.f, 2.f, 9.f}, 2), std::log(7.0), 1e-12);
  EXPECT_NEAR(LocalMapFeature({1.f, 5.f}, 20), std::log(3.0), 1e-12);
  EXPECT_TRUE(std::isnan(LocalMapFeature({}, 20)));
}

TEST(ThoroughCalibrationTest, AReferenceNeedsAnImagePerEmbedding) {
  auto bad = FeatureReference::Create(std::vector<float>(6, 0.f), 3,
                                      std::vector<uint8_t>(5, 0), 1, 1, 1);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("one per embedding"));
  auto nan = FeatureReference::Create({0.f, NAN, 0.f}, 3, {0}, 1, 1, 1);
  EXPECT_THAT(std::string(nan.status().message()), HasSubstr("non-finite"));
}

TEST(ThoroughCalibrationTest, OneGroupFarOutIsEnough) {
  Fitted f = FitSynthetic();
  const ImageLikelihood typical = Synthetic(f.gen, {0, 0, 0, 0, 0});
  const double typical_score = f.calibration.Score(typical);
  EXPECT_GT(f.calibration.PValue(typical_score), 0.02);
  // Each group alone moved by a few of its own spreads: flagged at 1%.
  const std::vector<std::vector<double>> moves = {{1.0, 0, 0, 0, 0},
                                                 {0, 4.0, 0, 0, 0},
                                                 {0, 0, 1.5, 0, 0},
                                                 {0, 0, 0, 0.8, 0},
                                                 {0, 0, 0, 0, 0.8}};
  for (size_t g = 0; g < moves.size(); ++g) {
    const ImageLikelihood odd = Synthetic(f.gen, moves[g]);
    const std::vector<double> z = f.calibration.GroupZ(odd);
    EXPECT_GT(z[g], 4.0) << ThoroughCalibration::GroupName(g);
    const double score = f.calibration.Score(odd);
    EXPECT_LE(f.calibration.PValue(score), 0.01) << ThoroughCalibration::GroupName(g);
    // Fisher's sum of the groups' log tails.
    double fisher = 0;
    for (double zg : z) fisher += -2.0 * LogUpperTail(zg);
    EXPECT_NEAR(score, fisher, 1e-9 * fisher);
  }
  // Too typical counts too (two-sided): a recon error far *below* the data.
  const ImageLikelihood too_good = Synthetic(f.gen, {0, 0, -1.5, 0, 0});
  EXPECT_GT(f.calibration.GroupZ(too_good)[2], 4.0);
  // Nearer to the training images than usual is typical: the kNN group is
  // one-sided.
  // (The reference is standard normal: its points are densest at the origin.)
  ImageLikelihood near = Synthetic(f.gen, {0, 0, 0, 0, 0});
  near.thorough->embedding = {0.f, 0.f, 0.f};
  EXPECT_LT(f.calibration.GroupZ(near)[1], -1.0);
  EXPECT_GT(f.calibration.PValue(f.calibration.Score(near)), 0.02);
  // So is the local group: a map matching better than usual is typical.
  const ImageLikelihood sharp = Synthetic(f.gen, {0, 0, 0, 0, -0.8});
  EXPECT_LT(f.calibration.GroupZ(sharp)[4], -4.0);
  // A missing feature scores as far out as possible.
  ImageLikelihood broken = typical;
  broken.thorough->recon_error.pop_back();
  EXPECT_EQ(f.calibration.PValue(f.calibration.Score(broken)),
            1.0 / (f.calibration.size() + 1.0));
}

TEST(ThoroughCalibrationTest, OnlyTheCombinedGroupsMoveTheScore) {
  Fitted f = FitSynthetic(400, 5, {"fast", "knn", "local"});
  const ImageLikelihood typical = Synthetic(f.gen, {0, 0, 0, 0, 0});
  ImageLikelihood odd_recon = typical;
  for (double& e : odd_recon.thorough->recon_error) e *= 100.0;
  EXPECT_GT(f.calibration.GroupZ(odd_recon)[2], 4.0);  // measured...
  EXPECT_DOUBLE_EQ(f.calibration.Score(odd_recon), f.calibration.Score(typical));
  ImageLikelihood odd_local = typical;
  for (float& c : odd_local.thorough->local_map) c *= 3.0f;
  EXPECT_LE(f.calibration.PValue(f.calibration.Score(odd_local)), 0.01);
  // The names are checked.
  std::mt19937_64 gen(3);
  std::vector<ImageLikelihood> images;
  for (int i = 0; i < 40; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0, 0}));
  ThoroughSetup setup;
  setup.combined = {"fast", "knn", "pixels"};
  auto unknown = ThoroughCalibration::Fit(
      images, f.calibration.reference(), setup);
  EXPECT_THAT(std::string(unknown.status().message()), HasSubstr("unknown group 'pixels'"));
  setup.combined = {"knn", "knn"};
  EXPECT_THAT(std::string(ThoroughCalibration::Fit(images, f.calibration.reference(), setup)
                              .status()
                              .message()),
              HasSubstr("twice"));
}

TEST(ThoroughCalibrationTest, PValuesKeepTheirRateOnCalibrationLikeImages) {
  Fitted f = FitSynthetic();
  // 2,000 fresh images from the calibration's distribution: the flagged
  // fraction at 5% is 5% up to the sampling error of 400 calibration images
  // and 2,000 draws (sd about 1.1% and 0.5%; allow 3 of the larger).
  int flagged = 0;
  const int n = 2000;
  for (int i = 0; i < n; ++i) {
    const ImageLikelihood im = Synthetic(f.gen, {0, 0, 0, 0, 0});
    flagged += f.calibration.PValue(f.calibration.Score(im)) <= 0.05;
  }
  EXPECT_NEAR(static_cast<double>(flagged) / n, 0.05, 0.033);
}

TEST(ThoroughCalibrationTest, ThePolicyUsesItOnlyAtTheThoroughLevel) {
  Fitted f = FitSynthetic();
  const ImageLikelihood odd = Synthetic(f.gen, {0, 4.0, 0, 0, 0});
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
  ASSERT_TRUE(a.images[0].local_distance.has_value());
  std::vector<float> cells = odd.thorough->local_map;
  std::sort(cells.rbegin(), cells.rend());
  EXPECT_NEAR(*a.images[0].local_distance, (cells[0] + cells[1] + cells[2]) / 3.0,
              1e-6);
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
  const auto reference = Reference(std::vector<float>(30 * kDim, 0.5f));
  std::vector<ImageLikelihood> images;
  for (int i = 0; i < 5; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0, 0}));
  ThoroughSetup setup;
  auto few = ThoroughCalibration::Fit(images, reference, setup);
  EXPECT_THAT(std::string(few.status().message()), HasSubstr("group fast"));
  for (int i = 0; i < 20; ++i) images.push_back(Synthetic(gen, {0, 0, 0, 0, 0}));
  images.back().thorough.reset();
  auto missing = ThoroughCalibration::Fit(images, reference, setup);
  EXPECT_THAT(std::string(missing.status().message()),
              HasSubstr("lacks its thorough features"));
  images.back() = Synthetic(gen, {0, 0, 0, 0, 0});
  images.back().thorough->local_map.clear();
  EXPECT_THAT(std::string(ThoroughCalibration::Fit(images, reference, setup)
                              .status()
                              .message()),
              HasSubstr("lacks its thorough features"));
  images.pop_back();
  setup.knn_k = 30;
  auto k = ThoroughCalibration::Fit(images, reference, setup);
  EXPECT_THAT(std::string(k.status().message()), HasSubstr("knn_k"));
  setup.knn_k = 5;
  setup.local_top = 0;
  EXPECT_THAT(std::string(ThoroughCalibration::Fit(images, reference, setup)
                              .status()
                              .message()),
              HasSubstr("local_top"));
  EXPECT_THAT(std::string(ThoroughCalibration::Fit(images, nullptr, setup)
                              .status()
                              .message()),
              HasSubstr("no reference"));
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
  EXPECT_EQ(back->thorough->reference()->images(), f.calibration.reference()->images());
  EXPECT_EQ(back->thorough->setup().local_top, 3);
  for (int i = 0; i < 5; ++i) {
    const ImageLikelihood im = Synthetic(f.gen, {0, 0.5 * i, 0, 0, 0.1 * i});
    EXPECT_DOUBLE_EQ(back->thorough->Score(im), f.calibration.Score(im));
  }
  // Damaged sections: the error names the section and the part.
  nlohmann::json j = nlohmann::json::parse(text);
  nlohmann::json bad = j;
  bad["anomaly"]["thorough"]["reference"]["float32_le_base64"] = "!!!";
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("anomaly.thorough: reference"));
  bad = j;
  bad["anomaly"]["thorough"]["reference"].erase("images");
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("before the local group"));
  bad = j;
  bad["anomaly"]["thorough"]["reference"]["images"]["height"] = 2;
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("one per embedding"));
  bad["anomaly"]["thorough"]["reference"]["images"]["height"] = int64_t{1} << 40;
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("one per embedding"));
  bad = j;
  bad["anomaly"]["thorough"]["reference"]["rows"] = int64_t{1} << 62;
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("rows x dimension"));
  bad = j;
  bad["anomaly"]["thorough"]["groups"].erase("local");
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("no group local"));
  // A section from before the local group is skipped, not an error: the
  // rest of the file still serves.
  nlohmann::json old = j;
  old["anomaly"]["thorough"].erase("local_neighbours");
  auto skipped = ParseCalibrationFile(old.dump());
  ASSERT_TRUE(skipped.ok()) << skipped.status();
  EXPECT_EQ(skipped->thorough, nullptr);
  ASSERT_EQ(skipped->skipped.size(), 1u);
  EXPECT_THAT(skipped->skipped[0], HasSubstr("vdm-calibrate"));
  bad = j;
  bad["anomaly"]["thorough"]["groups"].erase("knn");
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("no group knn"));
  bad = j;
  bad["anomaly"]["thorough"]["combined_groups"] = nlohmann::json::array();
  EXPECT_THAT(std::string(ParseCalibrationFile(bad.dump()).status().message()),
              HasSubstr("combined_groups: none"));
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
