// The learning-curve plot (model/train/plot.cc) and the metrics file
// (model/train/metrics.cc) it is drawn from.
#include "model/train/plot.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/train/metrics.h"

namespace vdm {
namespace {

using ::testing::DoubleNear;
using ::testing::ElementsAre;
using ::testing::Pointwise;

int CountColor(const Image8& image, std::array<uint8_t, 3> c) {
  const size_t plane = static_cast<size_t>(image.width) * image.height;
  int n = 0;
  for (size_t i = 0; i < plane; ++i) {
    n += image.pixels[i] == c[0] && image.pixels[plane + i] == c[1] &&
         image.pixels[2 * plane + i] == c[2];
  }
  return n;
}

TEST(PlotTest, NiceTicks) {
  EXPECT_THAT(NiceTicks(0, 1000, 5), ElementsAre(0, 200, 400, 600, 800, 1000));
  EXPECT_THAT(NiceTicks(3.3, 4.1, 4),
              Pointwise(DoubleNear(1e-9), {3.4, 3.6, 3.8, 4.0}));
  EXPECT_TRUE(NiceTicks(1, 1, 5).empty());
}

TEST(PlotTest, DrawsEachSeriesInItsColour) {
  PlotSeries a{"LOSS", {10, 20, 200}, {{0, 9}, {100, 5}, {200, 4}}};
  PlotSeries b{"BPD", {200, 10, 10}, {{100, 4.5}, {200, 3.9}}, true};
  auto image = PlotCurves({a, b});
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_EQ(image->channels, 3);
  EXPECT_EQ(image->width, 640);
  EXPECT_EQ(image->height, 400);
  EXPECT_GT(CountColor(*image, a.color), 300);  // line and legend
  EXPECT_GT(CountColor(*image, b.color), 300);
  EXPECT_GT(CountColor(*image, {0, 0, 0}), 500);  // axes, ticks, text
  EXPECT_FALSE(PlotCurves({PlotSeries{"EMPTY", {0, 0, 0}, {}}}).ok());
}

TEST(MetricsLogTest, ResumeDropsTheStepsAfterTheCheckpoint) {
  const std::string path =
      (std::filesystem::temp_directory_path() / "vdm_metrics_test.jsonl")
          .string();
  {
    auto log = MetricsLog::Open(path, /*resume_step=*/-1);
    ASSERT_TRUE(log.ok()) << log.status();
    for (int step : {10, 20, 30}) {
      ASSERT_TRUE((*log)->Write({{"kind", "train"}, {"step", step},
                                 {"loss", 5.0 - step / 10}}).ok());
    }
    ASSERT_TRUE((*log)->Write({{"kind", "validation"}, {"step", 20},
                               {"bpd", 4.0}}).ok());
    EXPECT_EQ((*log)->curve().loss.size(), 3u);
  }
  std::ofstream(path, std::ios::app) << "{\"kind\":\"tr";  // torn line
  auto log = MetricsLog::Open(path, /*resume_step=*/20);
  ASSERT_TRUE(log.ok()) << log.status();
  EXPECT_EQ((*log)->curve().loss.size(), 2u);
  EXPECT_EQ((*log)->curve().validation.size(), 1u);
  ASSERT_TRUE((*log)->Write({{"kind", "train"}, {"step", 30},
                             {"loss", 2.5}}).ok());
  log->reset();
  std::ifstream in(path);
  int lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  EXPECT_EQ(lines, 4);
  std::filesystem::remove(path);
}

TEST(MetricsLogTest, ReadsALearningCurveWithAStepOffset) {
  const std::string path =
      (std::filesystem::temp_directory_path() / "vdm_curve_test.jsonl")
          .string();
  {
    std::ofstream out(path);
    out << R"({"kind":"train","step":25,"loss":3.5})" "\n"
        << R"({"kind":"validation","step":50,"bpd":3.25})" "\n"
        << R"({"kind":"test","step":50,"bpd":3.2})" "\n"
        << R"({"kind":"train","step":50,"loss":3.0})" "\n"
        << R"({"kind":"tr)";  // torn last line
  }
  auto curve = ReadLearningCurve(path, /*step_offset=*/1000);
  ASSERT_TRUE(curve.ok()) << curve.status();
  EXPECT_THAT(curve->loss, ElementsAre(std::pair<double, double>(1025, 3.5),
                                       std::pair<double, double>(1050, 3.0)));
  EXPECT_THAT(curve->validation,
              ElementsAre(std::pair<double, double>(1050, 3.25)));
  auto image = PlotLearningCurve(curve->loss, curve->validation, "ELBO");
  ASSERT_TRUE(image.ok()) << image.status();
  EXPECT_GT(CountColor(*image, {220, 60, 40}), 50);  // validation markers

  std::ofstream(path) << "not a metrics file\n";
  EXPECT_EQ(ReadLearningCurve(path).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::filesystem::remove(path);
  auto missing = ReadLearningCurve(path);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(missing.status().message()),
              ::testing::HasSubstr(path));
}

}  // namespace
}  // namespace vdm
