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

}  // namespace
}  // namespace vdm
