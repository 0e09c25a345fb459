// A small line chart rasterized into an RGB Image8 (no plotting library in
// C++ here): axes, tick marks with numbers and grid lines, one polyline per
// series and a legend, in a built-in 3x5 pixel font. For the trainer's
// learning curve. Pure functions: thread-safe.
#ifndef VDM_MODEL_TRAIN_PLOT_H_
#define VDM_MODEL_TRAIN_PLOT_H_

#include <array>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/image_io.h"

namespace vdm {

struct PlotSeries {
  std::string label;  // legend text (the font has A-Z, 0-9 and . - + ( ) /)
  std::array<uint8_t, 3> color = {0, 0, 0};
  std::vector<std::pair<double, double>> points;  // (x, y), x increasing
  bool markers = false;  // a small square at each point
};

struct PlotOptions {
  int width = 640;
  int height = 400;
  std::string x_label = "STEP";
  std::string y_label = "BITS/DIM";
  // The y range leaves out the points with x in the first `skip_fraction` of
  // the x range (an untrained model's loss would flatten the rest); lines
  // there are clipped at the top.
  double skip_fraction = 0.1;
};

// Draws the series. Fails when no series has a finite point.
absl::StatusOr<Image8> PlotCurves(const std::vector<PlotSeries>& series,
                                  const PlotOptions& options = {});

// The trainer's learning-curve picture: the training loss (legend
// "TRAINING LOSS (<loss_name>)") and the validation BPD (with markers)
// against steps. Fails when both are empty.
absl::StatusOr<Image8> PlotLearningCurve(
    const std::vector<std::pair<double, double>>& loss,
    const std::vector<std::pair<double, double>>& validation,
    const std::string& loss_name);

// "Nice" tick positions (1, 2 or 5 times a power of ten) covering [lo, hi],
// about `target` of them.
std::vector<double> NiceTicks(double lo, double hi, int target);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_PLOT_H_
