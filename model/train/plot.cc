#include "model/train/plot.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace vdm {
namespace {

using Color = std::array<uint8_t, 3>;
constexpr Color kBlack = {0, 0, 0};
constexpr Color kGrid = {225, 225, 225};
constexpr int kScale = 2;             // font pixels per glyph pixel
constexpr int kAdvance = 4 * kScale;  // glyph width + 1 column of space

// 3x5 glyphs, row-major, '1' = ink.
constexpr char kGlyphChars[] = "0123456789.-+/()ABCDEFGHIJKLMNOPQRSTUVWXYZ";
constexpr const char* kGlyphs[] = {
    "111101101101111", "010110010010111", "111001111100111",
    "111001111001111", "101101111001001", "111100111001111",
    "111100111101111", "111001001010010", "111101111101111",
    "111101111001111", "000000000000010", "000000111000000",
    "000010111010000", "001001010100100", "010100100100010",
    "010001001001010", "010101111101101", "110101110101110",
    "011100100100011", "110101101101110", "111100110100111",
    "111100110100100", "011100101101011", "101101111101101",
    "111010010010111", "001001001101010", "101101110101101",
    "100100100100111", "101111111101101", "110101101101101",
    "010101101101010", "110101110100100", "010101101110011",
    "110101110101101", "011100010001110", "111010010010010",
    "101101101101111", "101101101101010", "101101111111101",
    "101101010101101", "101101010010010", "111001010100111"};

class Canvas {
 public:
  Canvas(int width, int height) {
    image_.channels = 3;
    image_.width = width;
    image_.height = height;
    image_.pixels.assign(static_cast<size_t>(3) * width * height, 255);
  }
  void Set(int x, int y, const Color& c) {
    if (x < 0 || y < 0 || x >= image_.width || y >= image_.height) return;
    const size_t plane = static_cast<size_t>(image_.width) * image_.height;
    const size_t at = static_cast<size_t>(y) * image_.width + x;
    for (int k = 0; k < 3; ++k) image_.pixels[k * plane + at] = c[k];
  }
  void Rect(int x0, int y0, int x1, int y1, const Color& c) {
    for (int y = y0; y <= y1; ++y) {
      for (int x = x0; x <= x1; ++x) Set(x, y, c);
    }
  }
  // Bresenham, 2 pixels thick, only inside the clip rectangle.
  void Line(int x0, int y0, int x1, int y1, const Color& c) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0);
    const int sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    while (true) {
      Clipped(x0, y0, c);
      Clipped(x0, y0 + 1, c);
      if (x0 == x1 && y0 == y1) break;
      const int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }
  // Text with its top-left corner at (x, y); unknown characters are blank.
  void Text(int x, int y, const std::string& text, const Color& c) {
    for (char ch : text) {
      const char* pos = std::strchr(kGlyphChars, std::toupper(ch));
      if (ch != ' ' && pos != nullptr && *pos != '\0') {
        const char* glyph = kGlyphs[pos - kGlyphChars];
        for (int i = 0; i < 15; ++i) {
          if (glyph[i] != '1') continue;
          const int gx = x + (i % 3) * kScale, gy = y + (i / 3) * kScale;
          Rect(gx, gy, gx + kScale - 1, gy + kScale - 1, c);
        }
      }
      x += kAdvance;
    }
  }
  void SetClip(int x0, int y0, int x1, int y1) {
    clip_ = {x0, y0, x1, y1};
  }
  Image8 Take() { return std::move(image_); }

 private:
  void Clipped(int x, int y, const Color& c) {
    if (x >= clip_[0] && y >= clip_[1] && x <= clip_[2] && y <= clip_[3]) {
      Set(x, y, c);
    }
  }
  Image8 image_;
  std::array<int, 4> clip_ = {0, 0, 1 << 30, 1 << 30};
};

double NiceStep(double lo, double hi, int target) {
  const double raw = (hi - lo) / std::max(1, target);
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0}) {
    if (m * power >= raw) return m * power;
  }
  return 10 * power;
}

std::string TickLabel(double v, double step) {
  const int decimals =
      std::max(0, static_cast<int>(-std::floor(std::log10(step) + 1e-9)));
  return absl::StrFormat("%.*f", decimals, std::abs(v) < 1e-12 ? 0.0 : v);
}

struct Range {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  void Add(double v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  bool Valid() const { return lo <= hi; }
};

// The data ranges: x over all finite points, y over those past the skip.
bool DataRanges(const std::vector<PlotSeries>& series, double skip,
                Range& x, Range& y) {
  for (const auto& s : series) {
    for (const auto& [px, py] : s.points) {
      if (std::isfinite(px) && std::isfinite(py)) x.Add(px);
    }
  }
  if (!x.Valid()) return false;
  const double cut = x.lo + skip * (x.hi - x.lo);
  for (int pass = 0; pass < 2 && !y.Valid(); ++pass) {
    for (const auto& s : series) {
      for (const auto& [px, py] : s.points) {
        if (std::isfinite(px) && std::isfinite(py) && (pass || px >= cut)) {
          y.Add(py);
        }
      }
    }
  }
  if (x.hi - x.lo < 1e-9) x.lo -= 1, x.hi += 1;
  if (y.hi - y.lo < 1e-9) y.lo -= 0.5, y.hi += 0.5;
  return true;
}

}  // namespace

std::vector<double> NiceTicks(double lo, double hi, int target) {
  std::vector<double> ticks;
  if (!(hi > lo)) return ticks;
  const double step = NiceStep(lo, hi, target);
  const double first = std::ceil(lo / step - 1e-9);
  for (double k = first; k * step <= hi + 1e-9 * step; k += 1) {
    ticks.push_back(k * step);
  }
  return ticks;
}

absl::StatusOr<Image8> PlotCurves(const std::vector<PlotSeries>& series,
                                  const PlotOptions& o) {
  Range xr, yr;
  if (o.width < 200 || o.height < 150) {
    return absl::InvalidArgumentError("plot must be at least 200x150");
  }
  if (!DataRanges(series, o.skip_fraction, xr, yr)) {
    return absl::InvalidArgumentError("nothing to plot");
  }
  const double ystep = NiceStep(yr.lo, yr.hi, 6);
  yr.lo = std::floor(yr.lo / ystep) * ystep;
  yr.hi = std::ceil(yr.hi / ystep) * ystep;
  const int left = 64, right = o.width - 16, top = 40, bottom = o.height - 40;
  auto px = [&](double x) {
    return left + static_cast<int>(std::lround((x - xr.lo) / (xr.hi - xr.lo) *
                                               (right - left)));
  };
  auto py = [&](double y) {
    const double f = std::clamp((y - yr.lo) / (yr.hi - yr.lo), -4.0, 5.0);
    return bottom - static_cast<int>(std::lround(f * (bottom - top)));
  };
  Canvas canvas(o.width, o.height);
  for (double v : NiceTicks(yr.lo, yr.hi, 6)) {
    const int y = py(v);
    canvas.Rect(left, y, right, y, kGrid);
    canvas.Rect(left - 5, y, left - 1, y, kBlack);
    const std::string label = TickLabel(v, ystep);
    canvas.Text(left - 8 - kAdvance * static_cast<int>(label.size()),
                y - 5, label, kBlack);
  }
  const double xstep = NiceStep(xr.lo, xr.hi, 6);
  for (double v : NiceTicks(xr.lo, xr.hi, 6)) {
    const int x = px(v);
    canvas.Rect(x, top, x, bottom, kGrid);
    canvas.Rect(x, bottom + 1, x, bottom + 5, kBlack);
    const std::string label = TickLabel(v, xstep);
    canvas.Text(x - kAdvance * static_cast<int>(label.size()) / 2, bottom + 9,
                label, kBlack);
  }
  canvas.Rect(left, top, left, bottom, kBlack);     // y axis
  canvas.Rect(left, bottom, right, bottom, kBlack);  // x axis
  canvas.Text(right - kAdvance * static_cast<int>(o.x_label.size()),
              o.height - 12, o.x_label, kBlack);
  canvas.Text(8, 8, o.y_label, kBlack);
  canvas.SetClip(left + 1, top, right, bottom - 1);
  int legend_x = left + 8 + kAdvance * static_cast<int>(o.y_label.size());
  for (const auto& s : series) {
    bool have_last = false;
    int lx = 0, ly = 0;
    for (const auto& [x, y] : s.points) {
      if (!std::isfinite(x) || !std::isfinite(y)) {
        have_last = false;
        continue;
      }
      const int cx = px(x), cy = py(y);
      if (have_last) canvas.Line(lx, ly, cx, cy, s.color);
      if (s.markers && cy >= top && cy <= bottom) {
        canvas.Rect(cx - 2, cy - 2, cx + 2, cy + 2, s.color);
      }
      lx = cx, ly = cy, have_last = true;
    }
    canvas.Rect(legend_x, 13, legend_x + 16, 14, s.color);
    canvas.Text(legend_x + 22, 9, s.label, kBlack);
    legend_x += 22 + kAdvance * static_cast<int>(s.label.size()) + 16;
  }
  return canvas.Take();
}

absl::StatusOr<Image8> PlotLearningCurve(
    const std::vector<std::pair<double, double>>& loss,
    const std::vector<std::pair<double, double>>& validation,
    const std::string& loss_name) {
  PlotSeries loss_series{"TRAINING LOSS (" + loss_name + ")", {40, 90, 200},
                         loss};
  PlotSeries validation_series{"VALIDATION BPD", {220, 60, 40}, validation,
                               /*markers=*/true};
  return PlotCurves({loss_series, validation_series});
}

}  // namespace vdm
