// The anomaly features and calibration (model/vdm/anomaly.h): the complexity
// term is the PNG the library writes, the bands sum to the diffusion term and
// the pixel map to the whole of it, the calibration is deterministic and its
// p-values are uniform on calibration-like data.
#include "model/vdm/anomaly.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "model/vdm/image_io.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/testing/oracle.h"

namespace vdm {
namespace {

TEST(AnomalyTest, ComplexityIsTheBitsOfTheMaximallyCompressedPng) {
  Image8 image{1, 28, 28, std::vector<uint8_t>(28 * 28)};
  for (size_t i = 0; i < image.pixels.size(); ++i) image.pixels[i] = (i * 37) % 251;
  const double expected = 8.0 * EncodePng(image, 9)->size() / (28.0 * 28.0);
  EXPECT_DOUBLE_EQ(*ComplexityBpd(image), expected);
  // A flat image is far simpler than a busy one.
  Image8 flat{1, 28, 28, std::vector<uint8_t>(28 * 28, 128)};
  EXPECT_LT(*ComplexityBpd(flat), 0.5 * *ComplexityBpd(image));
}

TEST(AnomalyTest, BandsSumToTheDiffusionTermAndThePixelMapToTheWhole) {
  auto oracle = OracleDenoiser::Create({}).value();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  const at::Tensor x = oracle->Sample(6, 0, gen);
  for (int k : {16, 20, 7}) {  // with and without equal rows per band
    ScoreOptions o;
    o.likelihood.times = k;
    o.seed = 11;
    const BpdScores s = ScoreImages(*oracle, x, o).value();
    ASSERT_EQ(s.band.size(1), kBands);
    EXPECT_TRUE(at::allclose(s.band.sum(1), s.diffusion, 1e-9, 1e-12)) << k;
    EXPECT_TRUE((s.band >= 0).all().item<bool>());
    const double dims = static_cast<double>(oracle->shape().dims());
    EXPECT_TRUE(at::allclose(s.pixel_bits.sum({1, 2}) / dims, s.diffusion,
                             1e-9, 1e-12))
        << k;
  }
}

TEST(AnomalyTest, BandProfilePutsEachRowInTheBandOfItsTime) {
  const at::Tensor losses = at::tensor({4.0, 8.0, 12.0, 16.0}, at::kDouble).view({1, 4});
  const at::Tensor times = at::tensor({0.1, 0.3, 0.6, 0.99}, at::kDouble).view({1, 4});
  const at::Tensor band = BandProfile(losses, times, 4, RowWeights(4, 1));
  EXPECT_TRUE(at::allclose(band, at::tensor({1.0, 2.0, 3.0, 4.0}, at::kDouble).view({1, 4})));
  // Replicates of unequal size: 3 and 2 points, weights 1/6 and 1/4.
  EXPECT_TRUE(at::allclose(
      RowWeights(5, 2),
      at::tensor({1 / 6.0, 1 / 4.0, 1 / 6.0, 1 / 4.0, 1 / 6.0}, at::kDouble)));
}

std::vector<std::vector<double>> GaussianFeatures(int n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> z;
  std::vector<std::vector<double>> out;
  for (int i = 0; i < n; ++i) {
    const double a = z(gen), b = z(gen), c = z(gen);
    // Correlated, differently scaled, like bpd - complexity and the bands.
    out.push_back({1.5 + 0.2 * a, 0.3 + 0.05 * (a + b), 0.8 + 0.1 * c,
                   1.1 + 0.1 * (b - c), 0.02 + 0.01 * a});
  }
  return out;
}

TEST(CalibrationTest, IsDeterministicAndSurvivesJson) {
  Calibration::Setup setup;
  setup.timesteps = 16;
  setup.seed = 5;
  setup.data = "synthetic";
  const auto features = GaussianFeatures(300, 1);
  const Calibration a = *Calibration::Fit(features, setup);
  const Calibration b = *Calibration::Fit(features, setup);
  EXPECT_EQ(a.ToJson(), b.ToJson());
  const Calibration back = *Calibration::FromJson(a.ToJson());
  EXPECT_EQ(back.ToJson(), a.ToJson());
  EXPECT_EQ(back.setup().timesteps, 16);
  EXPECT_DOUBLE_EQ(back.Score(features[7]), a.Score(features[7]));
  // Far from the data scores higher (less likely) than the mean.
  std::vector<double> far = features[0];
  far[0] += 5.0;
  EXPECT_GT(a.Score(far), a.Score({1.5, 0.3, 0.8, 1.1, 0.02}) + 10);
  EXPECT_LT(a.PValue(a.Score(far)), 0.01);
  EXPECT_FALSE(Calibration::FromJson("{}").ok());
  EXPECT_FALSE(Calibration::Fit(GaussianFeatures(4, 2), setup).ok())
      << "fewer images than features";
}

TEST(CalibrationTest, PValuesAreUniformOnCalibrationLikeData) {
  const Calibration c = *Calibration::Fit(GaussianFeatures(2000, 3), {});
  const auto fresh = GaussianFeatures(20000, 4);
  for (double rate : {0.01, 0.05, 0.1, 0.5}) {
    int below = 0;
    for (const auto& f : fresh) below += c.PValue(c.Score(f)) <= rate;
    const double observed = below / 20000.0;
    // Binomial spread of the fresh set plus the calibration's own.
    const double tolerance =
        4 * std::sqrt(rate * (1 - rate) / 20000.0) +
        3 * std::sqrt(rate * (1 - rate) / 2000.0);
    EXPECT_NEAR(observed, rate, tolerance) << "nominal " << rate;
  }
}

TEST(CalibrationTest, BatchPValueFlagsAShiftedSetButNotATypicalOne) {
  const Calibration c = *Calibration::Fit(GaussianFeatures(1000, 5), {});
  std::vector<double> typical, shifted;
  for (const auto& f : GaussianFeatures(16, 6)) {
    typical.push_back(c.Score(f));
    std::vector<double> g = f;
    g[0] += 0.3;  // 1.5 standard deviations: each image alone is plausible
    shifted.push_back(c.Score(g));
  }
  EXPECT_GT(c.BatchPValue(typical), 0.05);
  EXPECT_LT(c.BatchPValue(shifted), 0.01);
  EXPECT_EQ(c.BatchPValue(typical), c.BatchPValue(typical)) << "deterministic";
}

// The anomaly policy (ScoreAnomalies): one test per rule.
Calibration PolicyCalibration() {
  Calibration::Setup setup;
  setup.timesteps = 16;
  return *Calibration::Fit(GaussianFeatures(500, 7), setup);
}

// An image whose features are `f` (AnomalyFeatures: [bpd - complexity,
// bands]), with bpd = 2.
ImageLikelihood WithFeatures(const std::vector<double>& f) {
  ImageLikelihood image;
  image.bpd = 2.0;
  image.complexity = 2.0 - f[0];
  image.band.assign(f.begin() + 1, f.end());
  return image;
}

AnomalyRequest AsCalibrated() {
  AnomalyRequest r;
  r.timesteps = 16;
  return r;
}

TEST(AnomalyPolicyTest, UncalibratedScoreIsTheComplexityCorrectedBpd) {
  ImageLikelihood image = WithFeatures({1.5, 0.3, 0.8, 1.1, 0.02});
  image.bpd = 3.25;
  image.complexity = 1.0;
  const BatchAnomaly a = ScoreAnomalies({image, image}, nullptr, AsCalibrated());
  ASSERT_EQ(a.images.size(), 2u);
  ASSERT_TRUE(a.images[0].anomaly_score.has_value());
  EXPECT_DOUBLE_EQ(*a.images[0].anomaly_score, 2.25);
  EXPECT_FALSE(a.images[0].p_value.has_value());
  EXPECT_FALSE(a.images[0].is_anomaly.has_value());
  EXPECT_FALSE(a.images[0].llr.has_value());
  EXPECT_FALSE(a.batch_p_value.has_value()) << "no calibration";
}

TEST(AnomalyPolicyTest, CalibratedScoreGivesThePValueAndTheFlagAtTheRate) {
  const Calibration c = PolicyCalibration();
  const std::vector<double> typical = {1.5, 0.3, 0.8, 1.1, 0.02};
  std::vector<double> far = typical;
  far[0] += 5.0;
  AnomalyRequest request = AsCalibrated();
  request.false_positive_rate = 0.05;
  const BatchAnomaly a =
      ScoreAnomalies({WithFeatures(typical), WithFeatures(far)}, &c, request);
  for (size_t i = 0; i < 2; ++i) {
    const std::vector<double>& f = i == 0 ? typical : far;
    const ImageAnomaly& image = a.images[i];
    ASSERT_TRUE(image.anomaly_score && image.p_value && image.is_anomaly) << i;
    EXPECT_DOUBLE_EQ(*image.anomaly_score, c.Score(f));
    EXPECT_DOUBLE_EQ(*image.p_value, c.PValue(c.Score(f)));
    EXPECT_EQ(*image.is_anomaly, *image.p_value <= 0.05);
  }
  EXPECT_FALSE(*a.images[0].is_anomaly);
  EXPECT_TRUE(*a.images[1].is_anomaly);
  // The flag is at the request's rate: the typical image's own p-value
  // flags it.
  request.false_positive_rate = *a.images[0].p_value;
  EXPECT_TRUE(*ScoreAnomalies({WithFeatures(typical)}, &c, request)
                   .images[0]
                   .is_anomaly);
}

TEST(AnomalyPolicyTest, CalibrationAppliesOnlyToTheElboAtItsKAndNoise) {
  const Calibration c = PolicyCalibration();
  const ImageLikelihood image = WithFeatures({1.5, 0.3, 0.8, 1.1, 0.02});
  EXPECT_TRUE(CalibrationApplies(c, AsCalibrated()));
  AnomalyRequest other_k = AsCalibrated();
  other_k.timesteps = 32;
  AnomalyRequest shared = AsCalibrated();
  shared.shared_noise = true;
  for (const AnomalyRequest& r : {other_k, shared}) {
    EXPECT_FALSE(CalibrationApplies(c, r));
    const BatchAnomaly a = ScoreAnomalies({image, image}, &c, r);
    // The uncalibrated fallback, as without a calibration.
    EXPECT_DOUBLE_EQ(*a.images[0].anomaly_score, image.bpd - image.complexity);
    EXPECT_FALSE(a.images[0].p_value.has_value());
    EXPECT_FALSE(a.images[0].is_anomaly.has_value());
    EXPECT_FALSE(a.batch_p_value.has_value());
  }
  // The ODE's BPD has no features: no anomaly fields at all, llr included.
  AnomalyRequest ode = AsCalibrated();
  ode.method = ScoreMethod::kOde;
  EXPECT_FALSE(CalibrationApplies(c, ode));
  ImageLikelihood with_background = image;
  with_background.background_bpd = 1.0;
  const BatchAnomaly a = ScoreAnomalies({with_background}, &c, ode);
  ASSERT_EQ(a.images.size(), 1u);
  EXPECT_FALSE(a.images[0].anomaly_score.has_value());
  EXPECT_FALSE(a.images[0].p_value.has_value());
  EXPECT_FALSE(a.images[0].llr.has_value());
}

TEST(AnomalyPolicyTest, LlrOnlyWithABackgroundBpd) {
  const Calibration c = PolicyCalibration();
  ImageLikelihood with = WithFeatures({1.5, 0.3, 0.8, 1.1, 0.02});
  with.background_bpd = 0.5;
  const ImageLikelihood without = WithFeatures({1.5, 0.3, 0.8, 1.1, 0.02});
  for (const Calibration* calibration : {&c, static_cast<const Calibration*>(nullptr)}) {
    const BatchAnomaly a =
        ScoreAnomalies({with, without}, calibration, AsCalibrated());
    ASSERT_TRUE(a.images[0].llr.has_value());
    EXPECT_DOUBLE_EQ(*a.images[0].llr, 2.0 - 0.5);
    EXPECT_FALSE(a.images[1].llr.has_value());
  }
}

TEST(AnomalyPolicyTest, BatchPValueOnlyWithTwoOrMoreCalibratedImages) {
  const Calibration c = PolicyCalibration();
  std::vector<ImageLikelihood> images;
  std::vector<double> scores;
  for (const auto& f : GaussianFeatures(3, 8)) {
    const ImageLikelihood image = WithFeatures(f);
    images.push_back(image);
    scores.push_back(
        c.Score(AnomalyFeatures(image.bpd, image.complexity, image.band)));
  }
  const BatchAnomaly three = ScoreAnomalies(images, &c, AsCalibrated());
  ASSERT_TRUE(three.batch_p_value.has_value());
  EXPECT_DOUBLE_EQ(*three.batch_p_value, c.BatchPValue(scores));
  EXPECT_FALSE(ScoreAnomalies({images[0]}, &c, AsCalibrated())
                   .batch_p_value.has_value())
      << "one image";
  EXPECT_FALSE(ScoreAnomalies({}, &c, AsCalibrated()).batch_p_value.has_value());
  EXPECT_TRUE(ScoreAnomalies({}, &c, AsCalibrated()).images.empty());
  EXPECT_FALSE(ScoreAnomalies(images, nullptr, AsCalibrated())
                   .batch_p_value.has_value())
      << "uncalibrated";
}

}  // namespace
}  // namespace vdm
