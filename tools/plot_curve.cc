// vdm-plot-curve: draws the learning curve of one or more vdm-train metrics
// files into one PNG, as vdm-train does at each validation. A run continued
// from another model's weights (--init) counts its steps from 0; give it the
// earlier run's steps as an offset to draw the whole history:
//
//   vdm-plot-curve --metrics=first.pt.metrics.jsonl,cont.pt.metrics.jsonl@1356
//       --out=curve.png
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "model/train/metrics.h"
#include "model/train/plot.h"
#include "model/vdm/image_io.h"

ABSL_FLAG(std::vector<std::string>, metrics, {},
          "comma-separated metrics files (JSON lines from vdm-train), each "
          "optionally PATH@STEP_OFFSET");
ABSL_FLAG(std::string, out, "", "PNG to write");
ABSL_FLAG(std::string, loss_name, "ELBO",
          "name of the training loss in the legend");

namespace {

absl::Status Run() {
  const std::vector<std::string> files = absl::GetFlag(FLAGS_metrics);
  const std::string out = absl::GetFlag(FLAGS_out);
  if (files.empty() || out.empty()) {
    return absl::InvalidArgumentError("--metrics and --out are required");
  }
  vdm::LearningCurve all;
  for (const std::string& item : files) {
    std::vector<std::string> parts = absl::StrSplit(item, '@');
    double offset = 0;
    if (parts.size() > 2 ||
        (parts.size() == 2 && !absl::SimpleAtod(parts[1], &offset))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--metrics entry '", item, "' is not PATH or PATH@STEP_OFFSET"));
    }
    absl::StatusOr<vdm::LearningCurve> curve =
        vdm::ReadLearningCurve(parts[0], offset);
    if (!curve.ok()) return curve.status();
    all.loss.insert(all.loss.end(), curve->loss.begin(), curve->loss.end());
    all.validation.insert(all.validation.end(), curve->validation.begin(),
                          curve->validation.end());
    std::printf("%s: %zu losses, %zu validations, steps + %g\n",
                parts[0].c_str(), curve->loss.size(),
                curve->validation.size(), offset);
  }
  absl::StatusOr<vdm::Image8> image = vdm::PlotLearningCurve(
      all.loss, all.validation, absl::GetFlag(FLAGS_loss_name));
  if (!image.ok()) return image.status();
  absl::StatusOr<std::string> png = vdm::EncodePng(*image);
  if (!png.ok()) return png.status();
  if (absl::Status s = vdm::WriteFileAtomic(out, *png); !s.ok()) return s;
  std::printf("wrote %s\n", out.c_str());
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "vdm-plot-curve --metrics=A.jsonl[,B.jsonl@OFFSET...] --out=curve.png");
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = Run(); !s.ok()) {
    std::fprintf(stderr, "vdm-plot-curve: %s\n",
                 std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
