// vdm-calibrate: fits the anomaly calibration of a model (model/vdm/
// anomaly.h) on held-out training images and writes it beside the model,
// where vdm-server loads it (<model>.calibration.json).
//
//   build/vdm-calibrate --model=model/checkpoints/fmnist.pt \
//     --data=/usr/share/datasets/fashion-mnist
//
// The held-out images are the trainer's validation split: the last
// metadata.dataset.validation_images (else --images) images of the training
// set, never trained on. They are scored with the server's code, K and
// seed layout (tools/anomaly_scoring.h).
//
// First (--time_proposal, the default) it fits the proposal over diffusion
// times that the server's ELBO scores use (model/vdm/time_proposal.h): the
// first --proposal_images held-out images at K = 2 --proposal_fit_bins
// uniform times (their own seed, --proposal_seed), FitTimeProposal's
// choice of shape, bins and floor by held-out folds. Then it scores all
// held-out images with that proposal and fits the anomaly Gaussian on
// them, so the features are the ones the server computes. Both go in one
// version 2 file (model/vdm/calibration_file.h).
//
// With a feature network (--feature_model, by default <model>.features.pt
// when it exists) the same scoring also measures the thorough level's
// features (model/vdm/thorough.h), and the file gains anomaly.thorough:
// the first --reference_images training images and their features (the kNN
// reference and the local match's neighbours), the five groups' Gaussians,
// fitted on the held-out split, and --thorough_groups, the groups the score
// combines.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "model/train/dataset.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/local_match.h"
#include "model/vdm/thorough.h"
#include "model/vdm/likelihood.h"
#include "model/vdm/image_io.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/torchscript_model.h"
#include "nlohmann/json.hpp"
#include "tools/anomaly_scoring.h"

ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt", "the model (.pt)");
ABSL_FLAG(std::string, data, "/usr/share/datasets/fashion-mnist",
          "IDX dataset directory the model was trained on");
ABSL_FLAG(int64_t, images, 0,
          "held-out images (the last N of the training split); 0 = the "
          "model's metadata.dataset.validation_images");
ABSL_FLAG(int, timesteps, 16, "K, as ScoreBPD requests will use");
ABSL_FLAG(uint64_t, seed, 1, "seed of the scoring noise");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");
ABSL_FLAG(std::string, out, "", "output; empty = MODEL.calibration.json");
ABSL_FLAG(bool, time_proposal, true,
          "fit the proposal over diffusion times first and score the "
          "calibration images with it; false = uniform times, no proposal");
ABSL_FLAG(int64_t, proposal_images, 256,
          "held-out images the proposal is fitted on (the first of the split)");
ABSL_FLAG(int, proposal_fit_bins, 64,
          "fit bins F: 2F rows per image, two draws per bin");
ABSL_FLAG(std::string, proposal_losses, "",
          "a file of the fit's losses (one image per line): read when it "
          "exists, else written after they are computed; empty = none");
ABSL_FLAG(uint64_t, proposal_seed, 2,
          "seed of the proposal fit's rows (not the scoring seed)");
ABSL_FLAG(std::string, proposal_from, "",
          "reuse the time_proposal section of this calibration file instead "
          "of fitting one (the same model; saves the fit's ~10 minutes)");
ABSL_FLAG(std::string, feature_model, "",
          "feature network (.pt with features()) for the thorough level; "
          "empty = MODEL.features.pt when it exists; none = fast level only");
ABSL_FLAG(int64_t, reference_images, 5000,
          "training images (the first N) whose features are the thorough "
          "level's kNN reference");
ABSL_FLAG(int, knn_k, 5, "neighbours of the thorough level's kNN distance");
ABSL_FLAG(std::vector<std::string>, thorough_groups,
          std::vector<std::string>({"fast", "knn", "local"}),
          "the thorough level's groups that its score combines (fast, knn, "
          "recon_error, recon_distance, local; docs/anomaly.md, \"Choosing "
          "the combination\")");
ABSL_FLAG(int, exclude_class, -2,
          "leave out this class's training images before taking the held-out "
          "split, as vdm-train --exclude_class did; -1 = none; -2 (default) = "
          "the model metadata's training.exclude_class, else none");

namespace {

// --images, else the model metadata's dataset.validation_images, else 0.
int64_t HeldOutImages(const vdm::TorchScriptModel& model) {
  int64_t held_out = absl::GetFlag(FLAGS_images);
  if (held_out == 0) {
    const auto meta = nlohmann::json::parse(model.metadata(), nullptr, false);
    if (meta.is_object() && meta.contains("dataset") &&
        meta["dataset"].contains("validation_images")) {
      held_out = meta["dataset"]["validation_images"].get<int64_t>();
    }
  }
  return held_out;
}

// --exclude_class, with -2 resolved from the model metadata's
// training.exclude_class (else -1, none).
int ExcludedClass(const vdm::TorchScriptModel& model) {
  int excluded = absl::GetFlag(FLAGS_exclude_class);
  if (excluded == -2) {
    excluded = -1;
    const auto meta = nlohmann::json::parse(model.metadata(), nullptr, false);
    if (meta.is_object() && meta.contains("training") &&
        meta["training"].is_object() &&
        meta["training"].contains("exclude_class") &&
        meta["training"]["exclude_class"].is_number_integer()) {
      excluded = meta["training"]["exclude_class"].get<int>();
    }
  }
  return excluded;
}

// "DATA train images FROM..LAST[ without class N]".
std::string Provenance(int64_t from, int64_t last, int excluded) {
  return absl::StrFormat("%s train images %d..%d%s", absl::GetFlag(FLAGS_data),
                         from, last,
                         excluded >= 0 ? absl::StrFormat(" without class %d", excluded)
                                       : std::string());
}

// The fit's losses and control values from `path` (written by an earlier
// run with the same images and fit bins), or NotFound.
absl::StatusOr<vdm::ProposalFitData> ReadLosses(const std::string& path,
                                                int bins, int64_t n) {
  if (path.empty()) return absl::NotFoundError("no file");
  absl::StatusOr<std::string> text = vdm::ReadFile(path);
  if (!text.ok()) return text.status();
  vdm::ProposalFitData data;
  data.fit_bins = bins;
  for (absl::string_view line : absl::StrSplit(*text, '\n', absl::SkipEmpty())) {
    std::vector<double> l;
    for (absl::string_view v : absl::StrSplit(line, ' ', absl::SkipEmpty())) {
      double d;
      if (!absl::SimpleAtod(v, &d)) return absl::InvalidArgumentError(path);
      l.push_back(d);
    }
    if (static_cast<int>(l.size()) != 4 * bins) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": a line without 2 x ", bins, " losses and control values"));
    }
    data.loss.emplace_back(l.begin(), l.begin() + 2 * bins);
    data.control.emplace_back(l.begin() + 2 * bins, l.end());
  }
  if (static_cast<int64_t>(data.loss.size()) != n) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": ", data.loss.size(), " images, not ", n));
  }
  return data;
}

// Fits the time proposal on the first --proposal_images of `set` (training
// images from.. of the held-out split), for the estimator at `timesteps`.
absl::StatusOr<vdm::TimeProposal> FitProposal(vdm::TorchScriptModel& model,
                                              const vdm::Dataset& set,
                                              int timesteps, int64_t from,
                                              int excluded) {
  const int64_t n = std::min<int64_t>(absl::GetFlag(FLAGS_proposal_images),
                                      set.size());
  const int bins = absl::GetFlag(FLAGS_proposal_fit_bins);
  const uint64_t seed = absl::GetFlag(FLAGS_proposal_seed);
  const absl::Time start = absl::Now();
  const std::string cache = absl::GetFlag(FLAGS_proposal_losses);
  absl::StatusOr<vdm::ProposalFitData> data = ReadLosses(cache, bins, n);
  if (!data.ok()) {
    data = vdm::ProposalFitLosses(
        model, set.images.narrow(0, 0, n), bins, seed, 16,
        [start](int64_t done, int64_t total) {
          std::fprintf(stderr, "vdm-calibrate: proposal fit %lld/%lld images, %.0f s\n",
                       static_cast<long long>(done), static_cast<long long>(total),
                       absl::ToDoubleSeconds(absl::Now() - start));
        });
    if (!data.ok()) return data.status();
    if (!cache.empty()) {
      std::string text;
      for (size_t i = 0; i < data->loss.size(); ++i) {
        text += absl::StrJoin(data->loss[i], " ") + " " +
                absl::StrJoin(data->control[i], " ") + "\n";
      }
      VDM_RETURN_IF_ERROR(vdm::WriteFileAtomic(cache, text));
    }
  } else {
    std::fprintf(stderr, "vdm-calibrate: proposal fit losses from %s\n",
                 cache.c_str());
  }
  vdm::ProposalFitOptions options;
  options.times = timesteps;
  options.replicates = vdm::ReplicatesFor({timesteps});
  // Candidate bin counts that divide the fit bins.
  options.bins.clear();
  for (int b : {16, 32, 64}) {
    if (b <= bins && bins % b == 0) options.bins.push_back(b);
  }
  if (options.bins.empty()) options.bins.push_back(bins);
  vdm::TimeProposal::Provenance provenance;
  provenance.data = absl::StrCat(Provenance(from, from + n - 1, excluded),
                                 " (the first of the held-out split)");
  provenance.seed = seed;
  provenance.fit_rows_per_image = 2 * bins;
  auto fit = vdm::FitTimeProposal(*data, options, provenance);
  if (!fit.ok()) return fit.status();
  for (const std::string& line : fit->candidates) {
    std::fprintf(stderr, "vdm-calibrate: proposal candidate %s\n", line.c_str());
  }
  const vdm::TimeProposal& q = fit->proposal;
  std::fprintf(stderr,
               "vdm-calibrate: time proposal %s, %d bins, floor %.2f, max weight "
               "%.1f%s: predicted K = %d variance %.3f of uniform times (held-out "
               "folds), %.0f s\n",
               q.provenance().target.c_str(), q.bins(), q.provenance().floor,
               q.MaxWeight(), q.has_control() ? ", control variate" : "", timesteps, fit->predicted_variance / fit->uniform_variance,
               absl::ToDoubleSeconds(absl::Now() - start));
  return q;
}

// Fits the calibration on the features of the scored images (training
// images from..last, without class `excluded` when >= 0), recording how
// they were scored.
absl::StatusOr<vdm::Calibration> FitCalibration(
    const std::vector<vdm::ScoredImage>& scored,
    const vdm::AnomalyRequest& as_scored, uint64_t seed, int64_t from,
    int64_t last, int excluded) {
  std::vector<std::vector<double>> features;
  for (const auto& s : scored) features.push_back(s.features);
  vdm::Calibration::Setup setup;
  setup.timesteps = as_scored.timesteps;
  setup.shared_noise = as_scored.shared_noise;
  setup.time_proposal = as_scored.time_proposal;
  setup.seed = seed;
  setup.data = absl::StrCat(Provenance(from, last, excluded),
                            " (the trainer's held-out validation split)");
  return vdm::Calibration::Fit(features, setup);
}

// The policy on the calibration images themselves, as the server would
// score them: the calibration applies, and at the default rate about that
// fraction is flagged (the conformal rule). False when it does not apply.
bool CheckOnOwnImages(const vdm::Calibration& calibration,
                      const std::vector<vdm::ScoredImage>& scored,
                      const vdm::AnomalyRequest& as_scored) {
  if (!vdm::CalibrationApplies(calibration, as_scored)) {
    std::fprintf(stderr, "vdm-calibrate: the fitted setup does not match the "
                         "scoring (a bug)\n");
    return false;
  }
  const std::vector<vdm::ImageLikelihood> likelihoods(scored.begin(),
                                                      scored.end());
  const vdm::BatchAnomaly own =
      vdm::ScoreAnomalies(likelihoods, &calibration, as_scored);
  int flagged = 0;
  for (const vdm::ImageAnomaly& a : own.images) flagged += *a.is_anomaly;
  std::fprintf(stderr, "vdm-calibrate: %d of %zu calibration images flagged "
                       "at the default rate %g\n",
               flagged, own.images.size(), vdm::kDefaultFalsePositiveRate);
  return true;
}

// --feature_model resolved: the path, "" for none.
std::string FeatureModelPath(const std::string& model_path) {
  std::string path = absl::GetFlag(FLAGS_feature_model);
  if (path == "none") return "";
  if (path.empty()) {
    path = model_path + ".features.pt";
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (f == nullptr) return "";
    std::fclose(f);
  }
  return path;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "vdm-calibrate: %s\n", std::string(status.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Fits the anomaly calibration of a VDM on held-out training images.");
  absl::ParseCommandLine(argc, argv);
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  const std::string path = absl::GetFlag(FLAGS_model);
  auto model = vdm::TorchScriptModel::Load({path});
  if (!model.ok()) return Fail(model.status());
  int64_t held_out = HeldOutImages(**model);
  if (held_out < 50) {
    std::fprintf(stderr, "vdm-calibrate: need --images >= 50 held-out images "
                         "(the model's metadata names none)\n");
    return 2;
  }
  auto all = vdm::LoadIdxDataset(absl::GetFlag(FLAGS_data), "train",
                                 (*model)->shape(), 0);
  if (!all.ok()) return Fail(all.status());
  const int excluded = ExcludedClass(**model);
  if (excluded >= 0) {
    *all = vdm::WithoutClass(*all, excluded);
    std::fprintf(stderr, "vdm-calibrate: without class %d: %lld training "
                         "images\n", excluded, static_cast<long long>(all->size()));
  }
  if (held_out > all->size()) held_out = all->size();
  const int64_t from = all->size() - held_out;
  const vdm::Dataset set = all->Slice(from, all->size());
  vdm::SetScoring scoring;
  scoring.timesteps = absl::GetFlag(FLAGS_timesteps);
  scoring.seed = absl::GetFlag(FLAGS_seed);
  vdm::CalibrationFile file;
  const std::string reuse = absl::GetFlag(FLAGS_proposal_from);
  if (!reuse.empty() && absl::GetFlag(FLAGS_time_proposal)) {
    auto old = vdm::ReadCalibrationFile(reuse);
    if (!old.ok()) return Fail(old.status());
    if (old->time_proposal == nullptr) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("--proposal_from: ", reuse, " has no time_proposal")));
    }
    std::fprintf(stderr, "vdm-calibrate: the time proposal of %s (%s)\n",
                 reuse.c_str(), old->time_proposal->provenance().data.c_str());
    file.time_proposal = old->time_proposal;
    scoring.time_proposal = file.time_proposal;
  } else if (absl::GetFlag(FLAGS_time_proposal)) {
    auto q = FitProposal(**model, set, scoring.timesteps, from, excluded);
    if (!q.ok()) return Fail(q.status());
    file.time_proposal = std::make_shared<const vdm::TimeProposal>(*std::move(q));
    scoring.time_proposal = file.time_proposal;
  }
  const absl::Time start = absl::Now();
  scoring.progress = [start](int64_t done, int64_t total) {
    std::fprintf(stderr, "vdm-calibrate: %lld/%lld images, %.0f s\n",
                 static_cast<long long>(done), static_cast<long long>(total),
                 absl::ToDoubleSeconds(absl::Now() - start));
  };
  std::unique_ptr<vdm::FeatureModel> features;
  std::shared_ptr<const vdm::FeatureReference> reference;
  int64_t refs = 0;
  vdm::ThoroughSetup thorough;
  const std::string features_path = FeatureModelPath(path);
  if (!features_path.empty()) {
    auto loaded = vdm::FeatureModel::Load(features_path);
    if (!loaded.ok()) return Fail(loaded.status());
    features = *std::move(loaded);
    if (!features->has_local_features()) {
      return Fail(features->LocalFeatures(at::Tensor()).status());
    }
    thorough.knn_k = absl::GetFlag(FLAGS_knn_k);
    thorough.combined = absl::GetFlag(FLAGS_thorough_groups);
    thorough.feature_model = features_path;
    // The kNN reference: the first training images (never the held-out
    // split, which the features are fitted on), embedded and kept.
    refs = std::min(absl::GetFlag(FLAGS_reference_images), from);
    if (refs <= thorough.knn_k) {
      return Fail(absl::InvalidArgumentError(
          "--reference_images: too few training images before the held-out split"));
    }
    auto made = vdm::MakeFeatureReference(*features, all->images.narrow(0, 0, refs));
    if (!made.ok()) return Fail(made.status());
    reference = std::make_shared<const vdm::FeatureReference>(*std::move(made));
    scoring.thorough = thorough;
    scoring.feature_model = features.get();
    scoring.reference = reference.get();
    std::fprintf(stderr, "vdm-calibrate: thorough level with feature model %s "
                         "(%lld features)\n", features_path.c_str(),
                 static_cast<long long>(features->dimension()));
  }
  auto scored = vdm::ScoreSet(**model, set.images, scoring);
  if (!scored.ok()) return Fail(scored.status());
  // How ScoreSet scored the images (the ELBO at K, independent noise): the
  // setup the server's policy matches requests against.
  vdm::AnomalyRequest as_scored;
  as_scored.timesteps = scoring.timesteps;
  as_scored.time_proposal = scoring.time_proposal != nullptr;
  auto calibration = FitCalibration(*scored, as_scored, scoring.seed, from,
                                    all->size() - 1, excluded);
  if (!calibration.ok()) return Fail(calibration.status());
  if (!CheckOnOwnImages(*calibration, *scored, as_scored)) return 1;
  double mean_se = 0;
  for (const auto& s : *scored) mean_se += s.stderr_bpd / scored->size();
  std::fprintf(stderr, "vdm-calibrate: mean standard error at K = %d: %.4f "
                       "bits/dim (%s times)\n",
               scoring.timesteps, mean_se,
               scoring.time_proposal ? "importance-sampled" : "uniform");
  std::string out = absl::GetFlag(FLAGS_out);
  if (out.empty()) out = path + ".calibration.json";
  if (features != nullptr) {
    thorough.elbo = calibration->setup();
    thorough.elbo.data = absl::StrCat(
        calibration->setup().data, "; kNN reference: ",
        Provenance(0, refs - 1, excluded));
    const std::vector<vdm::ImageLikelihood> likelihoods(scored->begin(),
                                                        scored->end());
    auto fit = vdm::ThoroughCalibration::Fit(likelihoods, reference, thorough);
    if (!fit.ok()) return Fail(fit.status());
    file.thorough = std::make_shared<const vdm::ThoroughCalibration>(*std::move(fit));
    vdm::AnomalyRequest as_thorough = as_scored;
    as_thorough.level = vdm::AnomalyLevel::kThorough;
    const vdm::BatchAnomaly own = vdm::ScoreAnomalies(
        likelihoods, nullptr, as_thorough, file.thorough.get());
    int flagged = 0;
    for (const vdm::ImageAnomaly& a : own.images) flagged += a.is_anomaly.value_or(false);
    std::fprintf(stderr, "vdm-calibrate: thorough: %lld reference images; %d "
                         "of %zu calibration images flagged at %g\n",
                 static_cast<long long>(refs), flagged, own.images.size(),
                 vdm::kDefaultFalsePositiveRate);
  }
  file.anomaly = std::make_shared<const vdm::Calibration>(*std::move(calibration));
  const absl::Status written =
      vdm::WriteFileAtomic(out, vdm::CalibrationFileToJson(file));
  if (!written.ok()) return Fail(written);
  std::printf("vdm-calibrate: %lld images scored at K = %d in %.0f s; wrote %s\n",
              static_cast<long long>(set.size()), scoring.timesteps,
              absl::ToDoubleSeconds(absl::Now() - start), out.c_str());
  return 0;
}
