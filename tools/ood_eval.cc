// vdm-ood-eval: how well the anomaly scores separate out-of-distribution
// images from in-distribution ones (docs/anomaly.md). It scores, as the
// server would (tools/anomaly_scoring.h), --in_images test images and
// --ood_images images of each out-of-distribution set made here from other
// test images (no downloads):
//   noise     uniform random pixels
//   constant  one random gray level per image
//   inverted  255 - x
//   blurred   two passes of a 3x3 box blur
//   shuffled  the image's pixels randomly permuted
//   flipped   upside down (the data's pixel statistics, not its semantics)
//   rotated   a quarter turn
//   halves    the top half joined to the bottom half of a garment of
//             another class (local: a mask marks the changed pixels)
//   patch     a 9x9 patch of another class's garment, rotated, pasted on
//             the garment (local, with its mask)
//   noisy     Gaussian noise of sigma 40 grey levels added, rounded, clipped
//   class_N   with --exclude_class=N (a model trained without class N): the
//             test images of class N, a near out-of-distribution set; the
//             in-distribution images are then test images of the other
//             classes
// and prints, per set and score (raw BPD, complexity-corrected BPD, the
// calibrated anomaly_score; with --background_model the likelihood ratio
// llr = bpd - background_bpd; with --class_scores the implied classifier's
// features; with --classifier the feature-kNN baseline: the distance to the
// k-th nearest of --knn_reference training images in the classifier's
// penultimate features), AUROC, AUPR (out-of-distribution positive) and
// the FPR at 95% TPR; for the local sets the pixel AUROC of anomaly_map
// against their masks; then the observed false-positive rate of is_anomaly on
// the in-distribution images at nominal 1% and 5%. With the calibration's
// anomaly.thorough section and the feature network beside the model, also
// the thorough level's score ("thorough"), each of its groups' z alone, and
// its map's pixel AUROC (model/vdm/thorough.h). Nothing here is tuned on
// these sets: the features and the calibration come from training images.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <cstdio>
#include <filesystem>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "model/train/dataset.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/calibration_file.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/thorough.h"
#include "model/vdm/image_io.h"
#include "nlohmann/json.hpp"
#include "model/vdm/torchscript_model.h"
#include "tools/anomaly_scoring.h"
#include "tools/ood_sets.h"

ABSL_FLAG(std::string, model, "model/checkpoints/fmnist.pt", "the model (.pt)");
ABSL_FLAG(std::string, calibration, "",
          "calibration JSON; empty = MODEL.calibration.json");
ABSL_FLAG(std::string, data, "/usr/share/datasets/fashion-mnist",
          "IDX dataset directory (its t10k split is used)");
ABSL_FLAG(int64_t, in_images, 500, "in-distribution test images");
ABSL_FLAG(int64_t, ood_images, 300, "images per out-of-distribution set");
ABSL_FLAG(int, timesteps, 16, "K (the calibration's)");

ABSL_FLAG(uint64_t, seed, 7, "seed of the scoring noise and of the sets");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");
ABSL_FLAG(std::string, background_model, "",
          "background model (.pt): also score llr = bpd - background_bpd, on "
          "the same rows (as vdm-server --background_model)");
ABSL_FLAG(int, exclude_class, -1,
          "a class the model was trained without: in-distribution = test "
          "images of the other classes, and the set class_N = its test images");
ABSL_FLAG(std::string, sets,
          "noise,constant,inverted,blurred,shuffled,flipped,rotated,halves,"
          "patch,noisy,class",
          "the out-of-distribution sets to score (class: only with "
          "--exclude_class)");
ABSL_FLAG(std::string, classifier, "model/checkpoints/classifier.pt",
          "a classifier with features(f) (model/net/classifier.py): also "
          "score the feature-kNN baseline; empty = skip it");
ABSL_FLAG(int64_t, knn_reference, 5000,
          "feature kNN: the first N training images are the reference");
ABSL_FLAG(int, knn_k, 5, "feature kNN: distance to the k-th nearest");
ABSL_FLAG(std::string, feature_model, "",
          "the thorough level's feature network; empty = MODEL.features.pt "
          "when it exists and the calibration has anomaly.thorough; none = "
          "fast level only");
ABSL_FLAG(std::string, scores_out, "",
          "also write every image's scores, per set and kind, to this JSON "
          "file ({\"in-distribution\": {kind: [...]}, set: {...}}), to study "
          "a combination without scoring again; empty = none");
ABSL_FLAG(bool, class_scores, false,
          "also score every image under each label (num_classes more passes "
          "of K rows, common random numbers) for the implied classifier "
          "p(y|x): its entropy, and max_y log p(x|y) - log p(x) in bits/dim");

namespace {

using vdm::Auroc;

// Average precision with the positives `pos`.
double Aupr(const std::vector<double>& pos, const std::vector<double>& neg) {
  std::vector<std::pair<double, int>> all;
  for (double p : pos) all.emplace_back(p, 1);
  for (double q : neg) all.emplace_back(q, 0);
  std::sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first > b.first; });
  double hits = 0, ap = 0;
  for (size_t i = 0; i < all.size(); ++i) {
    if (all[i].second == 1) {
      hits += 1;
      ap += hits / (i + 1);
    }
  }
  return ap / pos.size();
}

// The fraction of `neg` at or above the score that flags 95% of `pos`.
double FprAt95Tpr(std::vector<double> pos, const std::vector<double>& neg) {
  std::sort(pos.begin(), pos.end());
  const double threshold = pos[static_cast<size_t>(0.05 * pos.size())];
  double n = 0;
  for (double q : neg) n += q >= threshold;
  return n / neg.size();
}

at::Tensor Blur(const at::Tensor& x) {
  at::Tensor f = x.to(at::kFloat);
  for (int pass = 0; pass < 2; ++pass) {
    f = at::avg_pool2d(at::constant_pad_nd(f, {1, 1, 1, 1}, 0), 3, 1);
  }
  return f.round().clamp(0, 255).to(at::kByte);
}

at::Tensor Shuffle(const at::Tensor& x, at::Generator& gen) {
  at::Tensor flat = x.reshape({x.size(0), -1}).clone();
  for (int64_t i = 0; i < flat.size(0); ++i) {
    flat[i] = flat[i].index_select(
        0, at::randperm(flat.size(1), gen, at::TensorOptions(at::kLong)));
  }
  return flat.view(x.sizes());
}

// The model, its calibration and the optional background model. The
// errors name what failed to load, as main prints them.
struct Models {
  std::unique_ptr<vdm::TorchScriptModel> model;
  std::optional<vdm::Calibration> calibration;
  // The calibration file's time proposal, which the server would score with.
  std::shared_ptr<const vdm::TimeProposal> time_proposal;
  std::unique_ptr<vdm::TorchScriptModel> background;
  // The thorough level: the file's anomaly.thorough and the feature
  // network; null = fast only.
  std::shared_ptr<const vdm::ThoroughCalibration> thorough;
  std::unique_ptr<vdm::FeatureModel> features;
};

absl::StatusOr<Models> LoadModels() {
  Models m;
  const std::string path = absl::GetFlag(FLAGS_model);
  auto model = vdm::TorchScriptModel::Load({path});
  if (!model.ok()) return model.status();
  m.model = *std::move(model);
  std::string cal_path = absl::GetFlag(FLAGS_calibration);
  if (cal_path.empty()) cal_path = path + ".calibration.json";
  absl::StatusOr<vdm::CalibrationFile> file = vdm::ReadCalibrationFile(cal_path);
  if (!file.ok()) return file.status();
  if (file->anomaly == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(cal_path, ": no anomaly.fast section"));
  }
  m.calibration = *file->anomaly;
  m.time_proposal = file->time_proposal;
  std::string features = absl::GetFlag(FLAGS_feature_model);
  if (features.empty() && file->thorough != nullptr) {
    features = path + ".features.pt";
    if (!std::filesystem::exists(features)) features = "none";
  }
  if (!features.empty() && features != "none") {
    if (file->thorough == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--feature_model: ", cal_path,
          " has no anomaly.thorough section (vdm-calibrate --feature_model)"));
    }
    auto loaded = vdm::FeatureModel::Load(features);
    if (!loaded.ok()) return loaded.status();
    m.features = *std::move(loaded);
    m.thorough = file->thorough;
  }
  if (const std::string b = absl::GetFlag(FLAGS_background_model); !b.empty()) {
    auto loaded = vdm::TorchScriptModel::Load({b});
    if (!loaded.ok()) {
      return absl::Status(loaded.status().code(),
                          absl::StrCat("--background_model: ",
                                       loaded.status().message()));
    }
    m.background = *std::move(loaded);
  }
  return m;
}

// The t10k images the sets come from: `in` (the in-distribution images),
// `base` (what the made sets transform) and, with --exclude_class, `held_out`
// (that class's images; `in` and `base` are then of the other classes).
struct TestImages {
  at::Tensor in, base, held_out;
  // base's labels, and the donors of the local sets: the next test images
  // after `base` (neither `in` nor `base`), with their labels.
  at::Tensor base_labels, pool, pool_labels;
};

absl::StatusOr<TestImages> LoadTestImages(const vdm::ImageShape& shape,
                                          int64_t n_in, int64_t n_ood,
                                          int excluded) {
  auto test = vdm::LoadIdxDataset(absl::GetFlag(FLAGS_data), "t10k", shape, 0);
  TestImages t;
  if (test.ok() && excluded >= 0) {
    t.held_out = test->images.index_select(
        0, test->labels.eq(excluded).nonzero().flatten());
    t.held_out = t.held_out.narrow(0, 0, std::min(n_ood, t.held_out.size(0)));
    *test = vdm::WithoutClass(*test, excluded);
  }
  if (!test.ok() || test->size() < n_in + n_ood) {
    return absl::NotFoundError(
        absl::StrFormat("cannot read %lld test images",
                        static_cast<long long>(n_in + n_ood)));
  }
  t.in = test->images.narrow(0, 0, n_in);
  t.base = test->images.narrow(0, n_in, n_ood);
  t.base_labels = test->labels.narrow(0, n_in, n_ood);
  const int64_t rest = test->size() - n_in - n_ood;
  t.pool = test->images.narrow(0, n_in + n_ood, std::min<int64_t>(rest, 1000));
  t.pool_labels = test->labels.narrow(0, n_in + n_ood, t.pool.size(0));
  return t;
}

using ImageSets = std::vector<std::pair<std::string, at::Tensor>>;
// The changed pixels of the local sets, by set name.
using SetMasks = std::map<std::string, at::Tensor>;

// Every out-of-distribution set (the file comment's list), drawing from
// `gen` in this order; "class" only with --exclude_class.
ImageSets MakeSets(const TestImages& t, int64_t n_ood, at::Generator& gen,
                   SetMasks* masks) {
  const at::Tensor& base = t.base;
  ImageSets all_sets = {
      {"noise", at::randint(0, 256, base.sizes(), gen, at::TensorOptions(at::kLong)).to(at::kByte)},
      {"constant", (at::randint(0, 256, {n_ood, 1, 1, 1}, gen, at::TensorOptions(at::kLong)) *
                    at::ones(base.sizes(), at::kLong)).to(at::kByte)},
      {"inverted", (255 - base.to(at::kInt)).to(at::kByte)},
      {"blurred", Blur(base)},
      {"shuffled", Shuffle(base, gen)},
      {"flipped", base.flip({2}).contiguous()},
      {"rotated", vdm::RotateQuarter(base)},
  };
  if (t.pool.size(0) > 0) {
    vdm::DefectSet halves =
        vdm::JoinHalves(base, t.base_labels, t.pool, t.pool_labels, gen);
    vdm::DefectSet patch = vdm::PastePatches(base, t.base_labels, t.pool,
                                             t.pool_labels, 9, gen);
    all_sets.emplace_back("halves", halves.images);
    all_sets.emplace_back("patch", patch.images);
    (*masks)["halves"] = halves.masks;
    (*masks)["patch"] = patch.masks;
  }
  // Gaussian noise of sigma 40 grey levels on the garment (drawn after the
  // sets above, so they stay as they were).
  all_sets.emplace_back(
      "noisy", (base.to(at::kDouble) +
                40.0 * at::randn(base.sizes(), gen, at::TensorOptions(at::kDouble)))
                   .round()
                   .clamp(0, 255)
                   .to(at::kByte));
  if (t.held_out.defined()) {
    all_sets.emplace_back("class", t.held_out);
  }
  return all_sets;
}

// The sets --sets names, in its order; "class" becomes class_N.
absl::StatusOr<ImageSets> SelectSets(const ImageSets& all_sets, int excluded) {
  ImageSets sets;
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_sets), ',', absl::SkipEmpty())) {
    bool found = false;
    for (const auto& [set_name, x] : all_sets) {
      if (set_name != name) continue;
      sets.emplace_back(name == "class" ? absl::StrCat("class_", excluded)
                                        : set_name,
                        x);
      found = true;
    }
    if (!found) {
      return absl::InvalidArgumentError(
          absl::StrCat("--sets: no set '", name, "'",
                       name == "class" ? " (it needs --exclude_class)" : ""));
    }
  }
  return sets;
}

// Score name -> one value per image, in the images' order.
using Scores = std::map<std::string, std::vector<double>>;

// How every set is scored: as ScoreSet scores it, with the anomaly fields
// from the server's policy (ScoreAnomalies).
struct Scorer {
  vdm::TorchScriptModel* model = nullptr;
  // The feature-kNN baseline: the classifier and its features of the
  // reference training images; null = not scored.
  vdm::FeatureModel* classifier = nullptr;
  at::Tensor knn_reference;
  int knn_k = 5;
  vdm::SetScoring scoring;
  const vdm::Calibration* calibration = nullptr;
  const vdm::ThoroughCalibration* thorough = nullptr;  // null = fast only
  vdm::AnomalyRequest as_scored;
  bool class_scores = false;
  absl::Time start;
};

// Exits with a message: a set that cannot be scored ends the evaluation.
template <typename T>
T OrExit(absl::StatusOr<T> s) {
  if (!s.ok()) {
    std::fprintf(stderr, "vdm-ood-eval: %s\n", std::string(s.status().message()).c_str());
    std::exit(1);
  }
  return *std::move(s);
}

// "class entropy" and "-(max_y gain)" of each image of `x`, whose bpd with
// no label is `bpd`: bpd under each label, on the same rows (same seeds:
// only the label differs); log p(x|y) ~ -D ln2 bpd_y, uniform p(y).
void AddClassScores(const Scorer& scorer, const at::Tensor& x,
                    const std::vector<vdm::ImageLikelihood>& unlabelled,
                    Scores* out) {
  const vdm::TorchScriptModel& model = *scorer.model;
  const int classes = model.num_classes();
  const double dims = static_cast<double>(model.shape().channels) *
                      model.shape().height * model.shape().width;
  vdm::SetScoring conditional = scorer.scoring;
  conditional.background = nullptr;
  std::vector<std::vector<double>> by_label;
  for (int y = 0; y < classes; ++y) {
    conditional.label = y;
    const std::vector<vdm::ScoredImage> c =
        OrExit(vdm::ScoreSet(*scorer.model, x, conditional));
    std::vector<double> b;
    for (const auto& s : c) b.push_back(s.bpd);
    by_label.push_back(std::move(b));
  }
  for (size_t i = 0; i < unlabelled.size(); ++i) {
    double best = by_label[0][i];
    std::vector<double> logit(classes);
    for (int y = 0; y < classes; ++y) {
      best = std::min(best, by_label[y][i]);
      logit[y] = -dims * std::log(2.0) * by_label[y][i];
    }
    const double top = *std::max_element(logit.begin(), logit.end());
    double z = 0;
    for (double l : logit) z += std::exp(l - top);
    double entropy = 0;
    for (double l : logit) {
      const double p = std::exp(l - top) / z;
      if (p > 0) entropy -= p * std::log(p);
    }
    (*out)["class entropy"].push_back(entropy);
    // Higher = more anomalous: the best label explains the image less
    // well than no label does (negated gain of the best label).
    (*out)["-(max_y gain)"].push_back(best - unlabelled[i].bpd);
  }
}

// The scores of the images `x` (the set `name`); their likelihoods also go
// to `kept` when given.
Scores ScoreImages(const Scorer& scorer, const at::Tensor& x,
                   const std::string& name,
                   std::vector<vdm::ImageLikelihood>* kept = nullptr) {
  const std::vector<vdm::ScoredImage> scored =
      OrExit(vdm::ScoreSet(*scorer.model, x, scorer.scoring));
  Scores out;
  const std::vector<vdm::ImageLikelihood> likelihoods(scored.begin(),
                                                      scored.end());
  // Uncalibrated, the policy's score is bpd - complexity.
  const vdm::BatchAnomaly plain =
      vdm::ScoreAnomalies(likelihoods, nullptr, scorer.as_scored);
  const vdm::BatchAnomaly calibrated =
      vdm::ScoreAnomalies(likelihoods, scorer.calibration, scorer.as_scored);
  if (scorer.thorough != nullptr) {
    vdm::AnomalyRequest thorough = scorer.as_scored;
    thorough.level = vdm::AnomalyLevel::kThorough;
    const vdm::BatchAnomaly t = vdm::ScoreAnomalies(
        likelihoods, scorer.calibration, thorough, scorer.thorough);
    for (size_t i = 0; i < likelihoods.size(); ++i) {
      const std::vector<double> z = scorer.thorough->GroupZ(likelihoods[i]);
      out["thorough"].push_back(*t.images[i].anomaly_score);
      // Fisher's sum over all five groups' z's (not served: the served
      // sum is over the calibration's combined groups; docs/anomaly.md
      // compares the rules).
      double fisher = 0;
      for (double zg : z) {
        fisher += std::isnan(zg) ? 1e300 : -2.0 * vdm::LogUpperTail(zg);
      }
      out["thorough, all groups"].push_back(fisher);
      for (int g = 0; g < vdm::ThoroughCalibration::kGroups; ++g) {
        out[absl::StrCat("z ", vdm::ThoroughCalibration::GroupName(g))]
            .push_back(z[g]);
      }
    }
    if (scorer.scoring.pixel_map) {
      for (const vdm::ScoredImage& s : scored) {
        out["#thorough map"].insert(out["#thorough map"].end(),
                                    s.thorough->map.begin(),
                                    s.thorough->map.end());
      }
    }
  }
  for (size_t i = 0; i < likelihoods.size(); ++i) {
    out["bpd"].push_back(likelihoods[i].bpd);
    out["bpd - complexity"].push_back(*plain.images[i].anomaly_score);
    out["anomaly_score"].push_back(*calibrated.images[i].anomaly_score);
    if (calibrated.images[i].llr) out["llr"].push_back(*calibrated.images[i].llr);
  }
  if (scorer.classifier != nullptr) {
    const at::Tensor f = OrExit(scorer.classifier->Features(x));
    const at::Tensor d =
        vdm::KthNearestDistance(f, scorer.knn_reference, scorer.knn_k);
    out["feature kNN"] = std::vector<double>(
        d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
  }
  if (scorer.scoring.pixel_map) {
    // anomaly_map as the server returns it, one [H, W] map per image, kept
    // under a name no table prints.
    for (const vdm::ScoredImage& s : scored) {
      out["#map"].insert(out["#map"].end(), s.pixel_bits.begin(),
                         s.pixel_bits.end());
    }
  }
  if (kept != nullptr) *kept = likelihoods;
  if (scorer.class_scores) AddClassScores(scorer, x, likelihoods, &out);
  std::fprintf(stderr, "vdm-ood-eval: scored %s (%lld images), %.0f s\n",
               name.c_str(), static_cast<long long>(x.size(0)),
               absl::ToDoubleSeconds(absl::Now() - scorer.start));
  return out;
}

// The score kinds of the table, in its order.
std::vector<std::string> ScoreKinds(bool background, bool class_scores,
                                    bool knn, bool thorough) {
  std::vector<std::string> kinds = {"bpd", "bpd - complexity", "anomaly_score"};
  if (thorough) {
    kinds.push_back("thorough");
    kinds.push_back("thorough, all groups");
    // Each group's z alone (what each adds; not served).
    for (int g = 0; g < vdm::ThoroughCalibration::kGroups; ++g) {
      kinds.push_back(absl::StrCat("z ", vdm::ThoroughCalibration::GroupName(g)));
    }
  }
  if (background) kinds.push_back("llr");
  if (knn) kinds.push_back("feature kNN");
  if (class_scores) {
    kinds.push_back("class entropy");
    kinds.push_back("-(max_y gain)");
  }
  return kinds;
}

// Scores each set and prints its table rows against the in-distribution
// scores, then the mean AUROC of each kind over the sets.
void PrintSeparation(const Scorer& scorer, const ImageSets& sets,
                     const SetMasks& masks, const Scores& in_scores,
                     const std::vector<std::string>& kinds,
                     nlohmann::json* dump) {
  std::printf("| set | score | AUROC | AUPR | FPR@95%%TPR |\n|---|---|---|---|---|\n");
  std::map<std::string, double> mean_auroc;
  std::vector<std::string> pixel_rows;
  for (const auto& [name, x] : sets) {
    const Scores ood = ScoreImages(scorer, x, name);
    for (const auto& [kind, values] : ood) {
      if (kind[0] != '#') (*dump)[name][kind] = values;
    }
    if (auto m = masks.find(name); m != masks.end() && ood.count("#map")) {
      const at::Tensor maps =
          at::tensor(ood.at("#map"), at::kDouble).view(m->second.sizes());
      pixel_rows.push_back(absl::StrFormat(
          "| %s | anomaly_map (diffusion bits per pixel) | %.3f | %.1f%% |",
          name, vdm::PixelAuroc(maps, m->second),
          100.0 * m->second.to(at::kDouble).mean().item<double>()));
      if (ood.count("#thorough map")) {
        const at::Tensor t = at::tensor(ood.at("#thorough map"), at::kDouble)
                                 .view(m->second.sizes());
        pixel_rows.push_back(absl::StrFormat(
            "| %s | thorough anomaly_map (local match) | %.3f | %.1f%% |",
            name, vdm::PixelAuroc(t, m->second),
            100.0 * m->second.to(at::kDouble).mean().item<double>()));
      }
    }
    for (const std::string& k : kinds) {
      const double auroc = Auroc(ood.at(k), in_scores.at(k));
      mean_auroc[k] += auroc / sets.size();
      std::printf("| %s | %s | %.3f | %.3f | %.3f |\n", name.c_str(), k.c_str(),
                  auroc, Aupr(ood.at(k), in_scores.at(k)),
                  FprAt95Tpr(ood.at(k), in_scores.at(k)));
    }
  }
  for (const std::string& k : kinds) {
    std::printf("| mean over the %zu sets | %s | %.3f | | |\n", sets.size(),
                k.c_str(), mean_auroc[k]);
  }
  if (!pixel_rows.empty()) {
    std::printf("\n| set | map | pixel AUROC | changed pixels |\n|---|---|---|---|\n");
    for (const std::string& row : pixel_rows) std::printf("%s\n", row.c_str());
  }
}

// The observed false-positive rate of is_anomaly on the in-distribution
// images at nominal 1% and 5%.
void PrintFalsePositives(const Scorer& scorer,
                         const std::vector<vdm::ImageLikelihood>& in_likelihoods,
                         int64_t n_in) {
  std::printf("\nis_anomaly on %lld in-distribution test images (not used for "
              "calibration; %zu calibration images):\n",
              static_cast<long long>(n_in), scorer.calibration->size());
  for (const vdm::AnomalyLevel level :
       {vdm::AnomalyLevel::kFast, vdm::AnomalyLevel::kThorough}) {
    if (level == vdm::AnomalyLevel::kThorough && scorer.thorough == nullptr) {
      continue;
    }
    for (double rate : {0.01, 0.05}) {
      vdm::AnomalyRequest at_rate = scorer.as_scored;
      at_rate.false_positive_rate = rate;
      at_rate.level = level;
      int flagged = 0;
      for (const vdm::ImageAnomaly& a :
           vdm::ScoreAnomalies(in_likelihoods, scorer.calibration, at_rate,
                               scorer.thorough)
               .images) {
        flagged += a.is_anomaly.value_or(false);
      }
      std::printf("  %s, nominal %.0f%%: observed %.2f%% (%d of %lld)\n",
                  vdm::AnomalyLevelName(level), 100 * rate,
                  100.0 * flagged / n_in, flagged, static_cast<long long>(n_in));
    }
  }
}

int Fail(const absl::Status& status, int exit_code) {
  std::fprintf(stderr, "vdm-ood-eval: %s\n", std::string(status.message()).c_str());
  return exit_code;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "AUROC / AUPR / FPR@95TPR of the anomaly scores on out-of-distribution "
      "sets made from the test images.");
  absl::ParseCommandLine(argc, argv);
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  absl::StatusOr<Models> models = LoadModels();
  if (!models.ok()) return Fail(models.status(), 1);
  const int64_t n_in = absl::GetFlag(FLAGS_in_images);
  const int64_t n_ood = absl::GetFlag(FLAGS_ood_images);
  const int excluded = absl::GetFlag(FLAGS_exclude_class);
  absl::StatusOr<TestImages> test =
      LoadTestImages(models->model->shape(), n_in, n_ood, excluded);
  if (!test.ok()) return Fail(test.status(), 1);
  at::Generator gen =
      at::make_generator<at::CPUGeneratorImpl>(absl::GetFlag(FLAGS_seed));
  SetMasks masks;
  absl::StatusOr<ImageSets> sets =
      SelectSets(MakeSets(*test, n_ood, gen, &masks), excluded);
  if (!sets.ok()) return Fail(sets.status(), 2);
  const bool class_scores = absl::GetFlag(FLAGS_class_scores);
  if (class_scores && models->model->num_classes() < 2) {
    return Fail(absl::InvalidArgumentError(
                    "--class_scores needs a class-conditional model"),
                2);
  }
  Scorer scorer;
  scorer.model = models->model.get();
  scorer.scoring.timesteps = absl::GetFlag(FLAGS_timesteps);
  scorer.scoring.seed = absl::GetFlag(FLAGS_seed);
  scorer.scoring.background = models->background.get();
  scorer.scoring.time_proposal = models->time_proposal;
  scorer.calibration = &*models->calibration;
  // The anomaly fields come from the server's policy (ScoreAnomalies), for
  // images scored as ScoreSet scores them: the ELBO at K, independent noise,
  // the file's time proposal when it has one (as the server scores).
  scorer.as_scored.timesteps = scorer.scoring.timesteps;
  scorer.as_scored.time_proposal = scorer.scoring.time_proposal != nullptr;
  scorer.class_scores = class_scores;
  scorer.scoring.pixel_map = !masks.empty();
  if (models->thorough != nullptr) {
    scorer.thorough = models->thorough.get();
    scorer.scoring.thorough = models->thorough->setup();
    scorer.scoring.feature_model = models->features.get();
    scorer.scoring.reference = models->thorough->reference().get();
  }
  std::unique_ptr<vdm::FeatureModel> classifier;
  if (const std::string c = absl::GetFlag(FLAGS_classifier); !c.empty()) {
    // Only its features(f): a FeatureModel, as the thorough level loads one.
    absl::StatusOr<std::unique_ptr<vdm::FeatureModel>> loaded =
        vdm::FeatureModel::Load(c);
    if (!loaded.ok()) return Fail(loaded.status(), 1);
    classifier = *std::move(loaded);
    auto train = vdm::LoadIdxDataset(absl::GetFlag(FLAGS_data), "train",
                                     models->model->shape(), 0,
                                     absl::GetFlag(FLAGS_knn_reference));
    if (!train.ok()) return Fail(train.status(), 1);
    if (excluded >= 0) *train = vdm::WithoutClass(*train, excluded);
    scorer.classifier = classifier.get();
    scorer.knn_reference = OrExit(classifier->Features(train->images));
    scorer.knn_k = absl::GetFlag(FLAGS_knn_k);
  }
  const vdm::Calibration::Setup& setup = scorer.calibration->setup();
  if (!vdm::CalibrationApplies(*scorer.calibration, scorer.as_scored)) {
    return Fail(absl::InvalidArgumentError(absl::StrFormat(
                    "the calibration is for K = %d%s%s; give --timesteps=%d",
                    setup.timesteps,
                    setup.shared_noise ? " with shared noise" : "",
                    setup.time_proposal ? " with the time proposal"
                                        : " with uniform times",
                    setup.timesteps)),
                2);
  }
  scorer.start = absl::Now();
  std::vector<vdm::ImageLikelihood> in_likelihoods;
  const Scores in_scores =
      ScoreImages(scorer, test->in, "test (in-distribution)", &in_likelihoods);
  nlohmann::json dump;
  for (const auto& [kind, values] : in_scores) {
    if (kind[0] != '#') dump["in-distribution"][kind] = values;
  }
  PrintSeparation(scorer, *sets, masks, in_scores,
                  ScoreKinds(models->background != nullptr, class_scores,
                             scorer.classifier != nullptr,
                             scorer.thorough != nullptr),
                  &dump);
  PrintFalsePositives(scorer, in_likelihoods, n_in);
  if (const std::string out = absl::GetFlag(FLAGS_scores_out); !out.empty()) {
    const absl::Status written = vdm::WriteFileAtomic(out, dump.dump());
    if (!written.ok()) return Fail(written, 1);
    std::fprintf(stderr, "vdm-ood-eval: wrote %s\n", out.c_str());
  }
  std::printf("took %.0f s\n", absl::ToDoubleSeconds(absl::Now() - scorer.start));
  return 0;
}
