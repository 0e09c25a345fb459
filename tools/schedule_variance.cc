// vdm-schedule-variance: the variance of the VLB estimator of one or more
// models on the same images (docs/schedule.md), scored by the library's
// scorer (ScoreImages, the code ScoreBPD runs), unconditionally:
//   - per image, the variance of the one-time estimate (K = 1), over
//     --repeats independent draws of (t, eps) on the same image, averaged
//     over the images (the part of the variance the schedule's shape sets);
//   - per batch, the variance of the mean of --batch one-time estimates
//     over different images (data and noise, as in training);
//   - at K = --times, the mean BPD and the mean per-image standard error
//     (BpdScores::stderr_bpd, what ScoreBPD returns as stderr_bpd).
// Prints one markdown table row per model.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "model/train/dataset.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/torchscript_model.h"

ABSL_FLAG(std::string, models, "", "comma-separated .pt files");
ABSL_FLAG(std::string, data, "/usr/share/datasets/fashion-mnist",
          "IDX dataset directory (its t10k split is used)");
ABSL_FLAG(int64_t, images, 256, "test images (the first N)");
ABSL_FLAG(int, repeats, 8, "independent K = 1 scorings of every image");
ABSL_FLAG(int64_t, batch, 64, "images per batch estimate");
ABSL_FLAG(int, times, 8, "K of the standard-error column");
ABSL_FLAG(uint64_t, seed, 1, "scoring seed");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "vdm-schedule-variance --models=a.pt,b.pt: VLB estimator variance");
  absl::ParseCommandLine(argc, argv);
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  const std::vector<std::string> models =
      absl::StrSplit(absl::GetFlag(FLAGS_models), ',', absl::SkipEmpty());
  if (models.empty()) {
    std::fprintf(stderr, "--models is required\n");
    return 2;
  }
  const int repeats = std::max(2, absl::GetFlag(FLAGS_repeats));
  const int64_t batch = std::max<int64_t>(1, absl::GetFlag(FLAGS_batch));
  std::printf(
      "| model | schedule | BPD (K=%d) | mean stderr_bpd (K=%d) | per-image "
      "var, K=1 (bpd^2) | per-batch var, B=%ld (bpd^2) |\n|---|---|---|---|"
      "---|---|\n",
      absl::GetFlag(FLAGS_times), absl::GetFlag(FLAGS_times),
      static_cast<long>(batch));
  for (const std::string& path : models) {
    auto model = vdm::TorchScriptModel::Load({path});
    if (!model.ok()) {
      std::fprintf(stderr, "%s\n", model.status().ToString().c_str());
      return 1;
    }
    auto data = vdm::LoadDataset(absl::GetFlag(FLAGS_data), "t10k",
                                 (*model)->shape(), (*model)->num_classes(),
                                 absl::GetFlag(FLAGS_images));
    if (!data.ok()) {
      std::fprintf(stderr, "%s\n", data.status().ToString().c_str());
      return 1;
    }
    vdm::ScoreOptions score;
    score.batch_rows = 256;
    score.likelihood.times = 1;
    std::vector<at::Tensor> runs;
    for (int r = 0; r < repeats; ++r) {
      score.seed = absl::GetFlag(FLAGS_seed) * 1000 + r;
      auto s = vdm::ScoreImages(**model, data->images, score);
      if (!s.ok()) {
        std::fprintf(stderr, "%s\n", s.status().ToString().c_str());
        return 1;
      }
      runs.push_back(s->bpd);
    }
    const at::Tensor m = at::stack(runs);  // [R, n] float64
    const double per_image = m.var(0).mean().item<double>();
    const int64_t n = m.size(1), nb = n / batch;
    double per_batch = 0;
    if (nb > 0) {
      // Batch estimates: the R draws of each of the n / B batches.
      const at::Tensor b =
          m.narrow(1, 0, nb * batch).reshape({repeats, nb, batch}).mean(2);
      per_batch = b.reshape({-1}).var().item<double>();
    }
    score.likelihood.times = absl::GetFlag(FLAGS_times);
    score.seed = absl::GetFlag(FLAGS_seed);
    auto k = vdm::ScoreImages(**model, data->images, score);
    if (!k.ok()) {
      std::fprintf(stderr, "%s\n", k.status().ToString().c_str());
      return 1;
    }
    std::string schedule = "?";
    const std::string& meta = (*model)->metadata();
    for (const char* kind : {"\"learned_endpoints\"", "\"learned\"",
                             "\"fixed\""}) {
      const size_t at = meta.find("\"kind\":" + std::string(kind));
      if (at != std::string::npos) {
        schedule = std::string(kind).substr(1, std::strlen(kind) - 2);
        break;
      }
    }
    std::printf("| %s | %s | %.4f | %.4f | %.4f | %.5f |\n", path.c_str(),
                schedule.c_str(), k->bpd.mean().item<double>(),
                k->stderr_bpd.mean().item<double>(), per_image, per_batch);
    std::fflush(stdout);
  }
  return 0;
}
