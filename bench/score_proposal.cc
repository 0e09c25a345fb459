// vdm-score-proposal: the ELBO score with uniform times against the
// calibration file's time proposal (model/vdm/time_proposal.h), in one
// alternated run (docs/performance.md, "Importance-sampled times").
//
//   build/vdm-score-proposal --model=model/checkpoints/fmnist.pt --images=500 \
//     --timesteps=16 --rounds=2 --reference_csv=/tmp/ref256.csv
//
// For each round and each K of --timesteps, it scores the first --images
// Fashion-MNIST test images with uniform times and then with the proposal
// (the server's scorer: ScoreImages in requests of 64 images seeded
// ChunkSeed(seed, c), "no label", independent noise; a fresh seed per
// round and mode) and prints images/s, the mean per-image standard error
// and the mean BPD with its standard error. With --reference_csv it
// compares every mean with a reference of the same images (by default K =
// 256, uniform times), computed first and written there if the file does
// not exist: the difference, its standard error from both runs' per-image
// standard errors (independent noise), and the difference in those units.
#include <ATen/ATen.h>
#include <torch/script.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "model/train/dataset.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/image_io.h"
#include "model/vdm/torchscript_model.h"
#include "tools/anomaly_scoring.h"

ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt", "the model (.pt)");
ABSL_FLAG(std::string, calibration, "",
          "calibration file with a time_proposal section; empty = "
          "MODEL.calibration.json");
ABSL_FLAG(std::string, data, "/usr/share/datasets/fashion-mnist",
          "IDX dataset directory (t10k images are scored)");
ABSL_FLAG(int64_t, images, 500, "the first N test images");
ABSL_FLAG(std::string, timesteps, "16", "comma-separated K to compare");
ABSL_FLAG(int, rounds, 2,
          "alternated rounds (uniform, proposal) per K; 0 = only compute the "
          "reference (no proposal needed)");
ABSL_FLAG(uint64_t, seed, 11, "base seed; round r, mode m uses seed + 10 r + m");
ABSL_FLAG(int, threads, 1, "torch intra-op threads");
ABSL_FLAG(std::string, reference_csv, "",
          "per-image reference (index,bpd,stderr_bpd); computed and written "
          "when missing; empty = no comparison");
ABSL_FLAG(int, reference_timesteps, 256, "K of the reference (uniform times)");
ABSL_FLAG(uint64_t, reference_seed, 100, "seed of the reference");

namespace {

struct Run {
  std::vector<double> bpd, se;
  double seconds = 0;
};

Run Score(vdm::TorchScriptModel& model, const at::Tensor& x, int k,
          uint64_t seed, std::shared_ptr<const vdm::TimeProposal> q,
          const char* what) {
  vdm::SetScoring s;
  s.timesteps = k;
  s.seed = seed;
  s.time_proposal = std::move(q);
  const absl::Time start = absl::Now();
  s.progress = [start, what](int64_t done, int64_t total) {
    std::fprintf(stderr, "vdm-score-proposal: %s %lld/%lld, %.0f s\n", what,
                 static_cast<long long>(done), static_cast<long long>(total),
                 absl::ToDoubleSeconds(absl::Now() - start));
  };
  auto scored = vdm::ScoreSet(model, x, s);
  if (!scored.ok()) {
    std::fprintf(stderr, "vdm-score-proposal: %s\n",
                 std::string(scored.status().message()).c_str());
    std::exit(1);
  }
  Run r;
  r.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  for (const auto& i : *scored) {
    r.bpd.push_back(i.bpd);
    r.se.push_back(i.stderr_bpd);
  }
  return r;
}

double Mean(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m += x / v.size();
  return m;
}

// The standard error of the mean over images of independent estimates.
double MeanSe(const std::vector<double>& se) {
  double s = 0;
  for (double x : se) s += x * x;
  return std::sqrt(s) / se.size();
}

bool ReadReference(const std::string& path, Run* r) {
  std::ifstream in(path);
  if (!in) return false;
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::vector<std::string> f = absl::StrSplit(line, ',');
    double b, s;
    if (f.size() < 3 || !absl::SimpleAtod(f[1], &b) || !absl::SimpleAtod(f[2], &s)) {
      return false;
    }
    r->bpd.push_back(b);
    r->se.push_back(s);
  }
  return !r->bpd.empty();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "ELBO scores with uniform times against the time proposal, alternated.");
  absl::ParseCommandLine(argc, argv);
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  torch::NoGradGuard no_grad;
  const std::string path = absl::GetFlag(FLAGS_model);
  auto model = vdm::TorchScriptModel::Load({path});
  if (!model.ok()) {
    std::fprintf(stderr, "vdm-score-proposal: %s\n",
                 std::string(model.status().message()).c_str());
    return 1;
  }
  std::string cal = absl::GetFlag(FLAGS_calibration);
  if (cal.empty()) cal = path + ".calibration.json";
  auto file = vdm::ReadCalibrationFile(cal);
  const bool rounds = absl::GetFlag(FLAGS_rounds) > 0;  // 0: the reference only
  if (rounds && (!file.ok() || file->time_proposal == nullptr)) {
    std::fprintf(stderr, "vdm-score-proposal: %s\n",
                 file.ok() ? (cal + ": no time_proposal section").c_str()
                           : std::string(file.status().message()).c_str());
    return 1;
  }
  const std::shared_ptr<const vdm::TimeProposal> q =
      rounds ? file->time_proposal : std::make_shared<const vdm::TimeProposal>();
  auto test = vdm::LoadIdxDataset(absl::GetFlag(FLAGS_data), "t10k",
                                  (*model)->shape(), 0);
  const int64_t n = absl::GetFlag(FLAGS_images);
  if (!test.ok() || test->size() < n) {
    std::fprintf(stderr, "vdm-score-proposal: cannot read %lld test images\n",
                 static_cast<long long>(n));
    return 1;
  }
  const at::Tensor x = test->images.narrow(0, 0, n);
  std::printf("model %s, proposal: %s, %d bins, floor %.2f, max weight %.1f%s\n",
              path.c_str(), q->provenance().target.c_str(), q->bins(),
              q->provenance().floor, q->MaxWeight(),
              q->has_control() ? ", control variate" : "");
  std::printf("%lld test images, %d torch thread(s)\n",
              static_cast<long long>(n), absl::GetFlag(FLAGS_threads));

  Run reference;
  const std::string ref_path = absl::GetFlag(FLAGS_reference_csv);
  const bool compare = !ref_path.empty();
  if (compare && !ReadReference(ref_path, &reference)) {
    const int rk = absl::GetFlag(FLAGS_reference_timesteps);
    reference = Score(**model, x, rk, absl::GetFlag(FLAGS_reference_seed),
                      nullptr, "reference");
    std::ostringstream csv;
    csv << "index,bpd,stderr_bpd\n";
    for (size_t i = 0; i < reference.bpd.size(); ++i) {
      csv << absl::StrFormat("%d,%.9f,%.9f\n", i, reference.bpd[i],
                             reference.se[i]);
    }
    if (!vdm::WriteFileAtomic(ref_path, csv.str()).ok()) {
      std::fprintf(stderr, "vdm-score-proposal: cannot write %s\n", ref_path.c_str());
      return 1;
    }
    std::printf("reference K = %d written to %s in %.0f s\n", rk,
                ref_path.c_str(), reference.seconds);
  }
  if (compare) {
    if (static_cast<int64_t>(reference.bpd.size()) != n) {
      std::fprintf(stderr, "vdm-score-proposal: %s has %zu images, not %lld\n",
                   ref_path.c_str(), reference.bpd.size(), static_cast<long long>(n));
      return 1;
    }
    std::printf("reference (%s): mean %.4f +- %.4f, mean per-image se %.4f\n",
                ref_path.c_str(), Mean(reference.bpd), MeanSe(reference.se),
                Mean(reference.se));
  }
  if (!rounds) return 0;
  std::printf("%-4s %-9s %5s %9s %13s %17s %s\n", "K", "times", "round",
              "images/s", "mean se", "mean bpd +- se",
              compare ? "minus reference (+- se, in se)" : "");
  for (absl::string_view ks : absl::StrSplit(absl::GetFlag(FLAGS_timesteps), ',')) {
    int k = 0;
    if (!absl::SimpleAtoi(ks, &k) || k < 2) {
      std::fprintf(stderr, "vdm-score-proposal: bad --timesteps entry '%s'\n",
                   std::string(ks).c_str());
      return 2;
    }
    std::vector<double> se_ratio;
    for (int round = 0; round < absl::GetFlag(FLAGS_rounds); ++round) {
      double se_uniform = 0;
      for (int mode = 0; mode < 2; ++mode) {
        const uint64_t seed = absl::GetFlag(FLAGS_seed) + 10 * round + mode;
        const Run r = Score(**model, x, k, seed, mode == 1 ? q : nullptr,
                            mode == 1 ? "proposal" : "uniform");
        const double mean = Mean(r.bpd), se = MeanSe(r.se), per = Mean(r.se);
        std::string diff;
        if (compare) {
          const double d = mean - Mean(reference.bpd);
          const double dse = std::hypot(se, MeanSe(reference.se));
          diff = absl::StrFormat("%+.4f +- %.4f (%+.2f)", d, dse, d / dse);
        }
        std::printf("%-4d %-9s %5d %9.2f %13.4f %9.4f +- %.4f %s\n", k,
                    mode == 1 ? "proposal" : "uniform", round, n / r.seconds,
                    per, mean, se, diff.c_str());
        std::fflush(stdout);
        if (mode == 0) {
          se_uniform = per;
        } else {
          se_ratio.push_back(per / se_uniform);
        }
      }
    }
    std::printf("K = %d: mean standard error, proposal / uniform: %.3f (per round:",
                k, Mean(se_ratio));
    for (double r : se_ratio) std::printf(" %.3f", r);
    std::printf(")\n");
  }
  return 0;
}
