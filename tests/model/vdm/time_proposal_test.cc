// The time proposal (model/vdm/time_proposal.h) and the calibration file
// that carries it (model/vdm/calibration_file.h), free of torch. The
// estimator with the proposal is tested on the exact oracle in
// likelihood_test.cc.
#include "model/vdm/time_proposal.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/vdm/anomaly.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/image_io.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

using ::testing::HasSubstr;

TEST(TimeProposalTest, NormalizesAndInvertsItsCdf) {
  const TimeProposal q = *TimeProposal::FromBins({1, 3, 0.5, 0.5});
  // Mean 1 over the bins: 4 / 5 x the given values.
  EXPECT_NEAR(q.density()[1], 2.4, 1e-12);
  EXPECT_NEAR(q.Density(0.3), 2.4, 1e-12);
  EXPECT_NEAR(q.Density(1.0), 0.4, 1e-12) << "t = 1 is in the last bin";
  EXPECT_NEAR(q.MaxWeight(), 2.5, 1e-12);
  // F(t) by the bins' masses; F^{-1}(F(t)) = t.
  auto cdf = [&](double t) {
    double f = 0;
    for (int b = 0; b < q.bins(); ++b) {
      const double lo = b / 4.0, hi = (b + 1) / 4.0;
      if (t > lo) f += q.density()[b] * (std::min(t, hi) - lo);
    }
    return f;
  };
  for (double t : {0.0, 0.1, 0.25, 0.3, 0.6, 0.74, 0.99, 1.0}) {
    EXPECT_NEAR(q.InverseCdf(cdf(t)), t, 1e-12) << t;
  }
  // Uniform u lands in each bin with the bin's mass.
  int in_second = 0;
  for (int k = 0; k < 10000; ++k) {
    in_second += q.InverseCdf((k + 0.5) / 10000) >= 0.25 &&
                 q.InverseCdf((k + 0.5) / 10000) < 0.5;
  }
  EXPECT_NEAR(in_second / 10000.0, 0.6, 1e-3);
  // The default is uniform times.
  const TimeProposal uniform;
  EXPECT_EQ(uniform.bins(), 1);
  EXPECT_DOUBLE_EQ(uniform.InverseCdf(0.37), 0.37);
  EXPECT_DOUBLE_EQ(uniform.Density(0.9), 1.0);
}

TEST(TimeProposalTest, RefusesDensitiesThatCannotWeight) {
  for (const std::vector<double>& bad :
       {std::vector<double>{}, {1, 0, 1}, {1, -1}, {1, NAN}, {1, INFINITY}}) {
    const auto q = TimeProposal::FromBins(bad);
    EXPECT_FALSE(q.ok());
  }
  EXPECT_THAT(std::string(TimeProposal::FromBins({1, 0}).status().message()),
              HasSubstr("bin 1"));
}

// Losses of n images on F fit bins: the loss lives mostly in bins
// [lo, hi) and is noisy there, small and steady elsewhere.
ProposalFitData Synthetic(int n, int f, int lo, int hi, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> z;
  ProposalFitData d;
  d.fit_bins = f;
  for (int i = 0; i < n; ++i) {
    std::vector<double> l;
    const double scale = 1 + 0.2 * z(gen);
    for (int b = 0; b < f; ++b) {
      for (int c = 0; c < 2; ++c) {
        const bool hot = b >= lo && b < hi;
        l.push_back(scale * (hot ? 20 + 15 * z(gen) : 1 + 0.1 * z(gen)));
      }
    }
    d.loss.push_back(std::move(l));
  }
  return d;
}

TEST(TimeProposalFitTest, PutsTheTimesWhereTheVarianceIsAndPredictsTheGain) {
  const ProposalFitData d = Synthetic(40, 64, 8, 16, 1);
  const ProposalFit fit = *FitTimeProposal(d, {}, {});
  const TimeProposal& q = fit.proposal;
  EXPECT_GT(q.Density(12 / 64.0), 3.0) << "more times where the loss varies";
  EXPECT_LT(q.Density(40 / 64.0), 0.6);
  EXPECT_GE(1 / q.MaxWeight(), 0.05 - 1e-12) << "the floor bounds the weights";
  EXPECT_LT(fit.predicted_variance, 0.5 * fit.uniform_variance);
  EXPECT_NEAR(q.provenance().predicted_variance_ratio,
              fit.predicted_variance / fit.uniform_variance, 1e-12);
  EXPECT_FALSE(fit.candidates.empty());
  // The prediction is unchanged by uniform times' own layout: the uniform
  // proposal's predicted variance is the same as one of many equal bins.
  const TimeProposal one, many = *TimeProposal::FromBins(std::vector<double>(16, 2.0));
  EXPECT_NEAR(PredictedVariance(d.loss[0], 64, one, 16, 2),
              PredictedVariance(d.loss[0], 64, many, 16, 2),
              1e-9 * PredictedVariance(d.loss[0], 64, one, 16, 2));
}

TEST(TimeProposalFitTest, RefusesBadInputsNamingThem) {
  ProposalFitData d = Synthetic(3, 8, 2, 4, 2);
  EXPECT_THAT(std::string(FitTimeProposal(d, {}, {}).status().message()),
              HasSubstr("2 images per fold"));
  d = Synthetic(10, 8, 2, 4, 2);
  ProposalFitOptions o;
  o.bins = {3};
  EXPECT_THAT(std::string(FitTimeProposal(d, o, {}).status().message()),
              HasSubstr("do not divide"));
  o = {};
  o.bins = {8};
  o.floors = {0.01};
  EXPECT_THAT(std::string(FitTimeProposal(d, o, {}).status().message()),
              HasSubstr("floor"));
  o.floors = {0.1};
  d.loss[3].pop_back();
  EXPECT_THAT(std::string(FitTimeProposal(d, o, {}).status().message()),
              HasSubstr("losses"));
}

Calibration SomeCalibration(bool time_proposal) {
  std::mt19937_64 gen(3);
  std::normal_distribution<double> z;
  std::vector<std::vector<double>> f;
  for (int i = 0; i < 50; ++i) {
    f.push_back({1 + z(gen), 0.5 + 0.1 * z(gen), 0.3 + 0.1 * z(gen),
                 0.2 + 0.1 * z(gen), 0.1 + 0.01 * z(gen)});
  }
  Calibration::Setup setup;
  setup.timesteps = 16;
  setup.time_proposal = time_proposal;
  setup.data = "synthetic";
  return *Calibration::Fit(f, setup);
}

TEST(CalibrationFileTest, RoundTripsBothSections) {
  TimeProposal::Provenance p;
  p.data = "train images 1..2";
  p.target = "sqrt(E[L^2])";
  p.floor = 0.1;
  p.seed = 7;
  p.fit_rows_per_image = 128;
  p.predicted_variance_ratio = 0.4;
  CalibrationFile file;
  file.time_proposal =
      std::make_shared<const TimeProposal>(*TimeProposal::FromBins({1, 2, 3, 4}, p));
  file.anomaly = std::make_shared<const Calibration>(SomeCalibration(true));
  const std::string text = CalibrationFileToJson(file);
  const nlohmann::json j = nlohmann::json::parse(text);
  EXPECT_EQ(j["format"], "vdm-calibration");
  EXPECT_EQ(j["version"], 2);
  EXPECT_TRUE(j.contains("time_proposal"));
  EXPECT_TRUE(j["anomaly"].contains("fast"));
  const CalibrationFile back = *ParseCalibrationFile(text);
  ASSERT_NE(back.time_proposal, nullptr);
  ASSERT_NE(back.anomaly, nullptr);
  EXPECT_EQ(back.time_proposal->density(), file.time_proposal->density());
  EXPECT_EQ(back.time_proposal->provenance().target, "sqrt(E[L^2])");
  EXPECT_EQ(back.time_proposal->provenance().seed, 7u);
  EXPECT_TRUE(back.anomaly->setup().time_proposal);
  EXPECT_EQ(CalibrationFileToJson(back), text);
  // Either section alone.
  CalibrationFile only_q;
  only_q.time_proposal = file.time_proposal;
  const CalibrationFile q_back = *ParseCalibrationFile(CalibrationFileToJson(only_q));
  EXPECT_NE(q_back.time_proposal, nullptr);
  EXPECT_EQ(q_back.anomaly, nullptr);
  const Calibration uniform = SomeCalibration(false);
  const CalibrationFile a_back = *ParseCalibrationFile(uniform.ToJson());
  EXPECT_EQ(a_back.time_proposal, nullptr);
  EXPECT_FALSE(a_back.anomaly->setup().time_proposal);
  EXPECT_EQ(Calibration::FromJson(uniform.ToJson())->ToJson(), uniform.ToJson());
  // A section this build does not know is ignored.
  nlohmann::json newer = nlohmann::json::parse(text);
  newer["anomaly"]["exhaustive"] = {{"something", 1}};
  newer["per_version"] = nlohmann::json::array();
  EXPECT_TRUE(ParseCalibrationFile(newer.dump()).ok());
}

TEST(CalibrationFileTest, VersionOneFilesStillLoad) {
  // The shipped model's calibration as vdm-calibrate wrote it before the
  // proposal (format "vdm-calibration/1", the Gaussian at the top level).
  const std::string v1 =
      *ReadFile(std::string(VDM_TESTDATA_DIR) + "/calibration_v1.json");
  const CalibrationFile file = *ParseCalibrationFile(v1);
  EXPECT_EQ(file.time_proposal, nullptr);
  ASSERT_NE(file.anomaly, nullptr);
  EXPECT_EQ(file.anomaly->setup().timesteps, 16);
  EXPECT_FALSE(file.anomaly->setup().time_proposal);
  EXPECT_EQ(file.anomaly->size(), 500u);
  EXPECT_EQ(Calibration::FromJson(v1)->size(), 500u);
  // Written back, it is a version 2 file with the same Gaussian.
  const Calibration again =
      *Calibration::FromJson(CalibrationFileToJson(file));
  EXPECT_DOUBLE_EQ(again.Score({-2, 1, 1, 0.3, 0.04}),
                   file.anomaly->Score({-2, 1, 1, 0.3, 0.04}));
}

std::string Message(const std::string& text) {
  return std::string(ParseCalibrationFile(text).status().message());
}

TEST(CalibrationFileTest, AMalformedSectionIsNamed) {
  CalibrationFile file;
  file.time_proposal =
      std::make_shared<const TimeProposal>(*TimeProposal::FromBins({1, 2}));
  file.anomaly = std::make_shared<const Calibration>(SomeCalibration(true));
  const nlohmann::json good = nlohmann::json::parse(CalibrationFileToJson(file));

  nlohmann::json j = good;
  j["time_proposal"]["density"] = {1.0, -2.0};
  EXPECT_THAT(Message(j.dump()), HasSubstr("section time_proposal"));
  EXPECT_THAT(Message(j.dump()), HasSubstr("bin 1"));
  j = good;
  j["time_proposal"]["bins"] = 3;
  EXPECT_THAT(Message(j.dump()), HasSubstr("section time_proposal"));
  j = good;
  j["time_proposal"].erase("density");
  EXPECT_THAT(Message(j.dump()), HasSubstr("section time_proposal"));
  j = good;
  j["anomaly"]["fast"].erase("mean");
  EXPECT_THAT(Message(j.dump()), HasSubstr("section anomaly.fast"));
  j = good;
  j["anomaly"] = 3;
  EXPECT_THAT(Message(j.dump()), HasSubstr("section anomaly"));
  j = good;
  j.erase("time_proposal");
  EXPECT_THAT(Message(j.dump()), HasSubstr("no time_proposal section"))
      << "features scored with a proposal the file does not have";
  j = good;
  j["version"] = 3;
  EXPECT_THAT(Message(j.dump()), HasSubstr("version 3"));
  j = good;
  j["format"] = "something-else";
  EXPECT_THAT(Message(j.dump()), HasSubstr("something-else"));
  EXPECT_THAT(Message("not json"), HasSubstr("not a JSON object"));
  EXPECT_THAT(std::string(Calibration::FromJson(
                              CalibrationFileToJson({file.time_proposal, nullptr}))
                              .status()
                              .message()),
              HasSubstr("no anomaly.fast section"));
}

TEST(CalibrationFileTest, ACalibrationAppliesOnlyToScoresWithItsTimes) {
  const Calibration with = SomeCalibration(true), without = SomeCalibration(false);
  AnomalyRequest r;
  r.timesteps = 16;
  r.time_proposal = true;
  EXPECT_TRUE(CalibrationApplies(with, r));
  EXPECT_FALSE(CalibrationApplies(without, r));
  r.time_proposal = false;
  EXPECT_FALSE(CalibrationApplies(with, r));
  EXPECT_TRUE(CalibrationApplies(without, r));
  ImageLikelihood image;
  image.bpd = 2;
  image.band = {0.5, 0.5, 0.5, 0.5};
  EXPECT_FALSE(ScoreAnomalies({image}, &with, r).images[0].p_value.has_value());
  EXPECT_TRUE(ScoreAnomalies({image}, &without, r).images[0].p_value.has_value());
}

}  // namespace
}  // namespace vdm
