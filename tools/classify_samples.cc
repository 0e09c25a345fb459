// vdm-classify: are guided samples recognisable as their class? Samples
// --per_class images of every class from a class-conditional VDM with
// classifier-free guidance (deterministic DDIM by default), classifies them
// with the CNN of model/net/classifier.py, and prints per class and overall
// the fraction classified as the class asked for (issue 4's bar: >= 0.9 at
// guidance 3).
//
//   vdm-classify --model=model/checkpoints/fmnist.pt \
//       --classifier=model/checkpoints/classifier.pt [--per_class=100]
//       [--guidance=3 --steps=50 --sampler=ddim --threads=2 --require=0.9]
//
// With --data=DIR it first checks the classifier on the real test images
// (IDX files, e.g. /usr/share/datasets/fashion-mnist).
#include <ATen/Parallel.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "model/train/dataset.h"
#include "model/vdm/torchscript_model.h"
#include "tools/classifier.h"

namespace {
// The samplers that take eta, from the library's sampler table.
std::string TakesEtaList() {
  return vdm::SamplerNameList(
      ", ", [](const vdm::SamplerTraits& t) { return t.takes_eta; });
}
}  // namespace

ABSL_FLAG(std::string, model, "", "generator: a class-conditional VDM (.pt)");
ABSL_FLAG(std::string, classifier, "model/checkpoints/classifier.pt",
          "classifier (.pt) from model/net/classifier.py");
ABSL_FLAG(int64_t, per_class, 100, "samples per class");
ABSL_FLAG(double, guidance, 3.0, "classifier-free guidance scale");
ABSL_FLAG(int, steps, 50, "sampler steps");
ABSL_FLAG(std::string, sampler, "ddim",
          absl::StrCat("one of ", vdm::SamplerNameList(", ")));
ABSL_FLAG(double, eta, 0.0,
          absl::StrCat("eta of ", TakesEtaList(), " (0 = deterministic)"));
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(int64_t, batch, 100, "images per sampling call");
ABSL_FLAG(int, threads, 2, "torch intra-op threads");
ABSL_FLAG(std::string, precision, "fp32",
          "generator forward precision: fp32, bf16 or auto (as vdm-server)");
ABSL_FLAG(std::string, data, "",
          "optional IDX dataset directory: first report the classifier's "
          "accuracy on its t10k images");
ABSL_FLAG(double, require, 0.0,
          "exit with status 3 when the overall fraction is below this");

namespace {

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "vdm-classify: %s\n",
               std::string(status.message()).c_str());
  return 1;
}

// Accuracy of the classifier on the test split of an IDX dataset.
absl::Status ReportRealAccuracy(vdm::ImageClassifier& classifier,
                                const std::string& dir) {
  absl::StatusOr<vdm::Dataset> test = vdm::LoadIdxDataset(
      dir, "t10k", classifier.shape(), classifier.num_classes());
  if (!test.ok()) return test.status();
  absl::StatusOr<at::Tensor> predicted = classifier.Classify(test->images);
  if (!predicted.ok()) return predicted.status();
  const double acc =
      predicted->eq(test->labels).to(at::kDouble).mean().item<double>();
  std::printf("classifier accuracy on %ld real test images: %.4f\n",
              static_cast<long>(test->size()), acc);
  return absl::OkStatus();
}

// The options of CheckGuidedSamples from the flags.
absl::StatusOr<vdm::GuidedCheckOptions> OptionsFromFlags() {
  vdm::GuidedCheckOptions options;
  absl::StatusOr<vdm::SamplerType> type =
      vdm::ParseSamplerType(absl::GetFlag(FLAGS_sampler));
  if (!type.ok()) return type.status();
  options.sampler.type = *type;
  options.sampler.steps = absl::GetFlag(FLAGS_steps);
  options.sampler.eta = absl::GetFlag(FLAGS_eta);
  if (options.sampler.eta != 0.0 && !vdm::TraitsOf(*type).takes_eta) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--eta applies only to ", TakesEtaList(), ", not ",
        vdm::SamplerName(*type)));
  }
  options.per_class = absl::GetFlag(FLAGS_per_class);
  options.guidance = absl::GetFlag(FLAGS_guidance);
  options.seed = absl::GetFlag(FLAGS_seed);
  options.batch = absl::GetFlag(FLAGS_batch);
  return options;
}

// One line per class: the fraction right and the most frequent wrong answer.
void PrintResult(const vdm::GuidedCheckResult& result,
                 const std::vector<std::string>& names) {
  const int k = static_cast<int>(names.size());
  std::printf("%-5s %-12s %-9s %s\n", "class", "name", "fraction",
              "most often confused with");
  for (int c = 0; c < k; ++c) {
    int other = c == 0 ? 1 : 0;
    for (int j = 0; j < k; ++j) {
      if (j != c && result.confusion[c][j] > result.confusion[c][other]) {
        other = j;
      }
    }
    const int64_t n = result.confusion[c][other];
    std::printf(
        "%-5d %-12s %-9.3f %s\n", c, names[c].c_str(), result.Fraction(c),
        n == 0 ? "-" : absl::StrCat(names[other], " (", n, ")").c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Samples guided images per class and classifies them.\n"
      "  vdm-classify --model=gen.pt --classifier=classifier.pt");
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_model).empty()) {
    return Fail(absl::InvalidArgumentError("--model is required"));
  }
  absl::StatusOr<vdm::GuidedCheckOptions> options = OptionsFromFlags();
  if (!options.ok()) return Fail(options.status());
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));

  auto classifier = vdm::ImageClassifier::Load(absl::GetFlag(FLAGS_classifier));
  if (!classifier.ok()) return Fail(classifier.status());
  vdm::TorchScriptModel::Options model_options;
  model_options.path = absl::GetFlag(FLAGS_model);
  model_options.precision = absl::GetFlag(FLAGS_precision);
  auto model = vdm::TorchScriptModel::Load(model_options);
  if (!model.ok()) return Fail(model.status());
  std::printf("generator %s; classifier %s (recorded test accuracy %.4f)\n",
              model_options.path.c_str(),
              absl::GetFlag(FLAGS_classifier).c_str(),
              (*classifier)->recorded_accuracy());
  if (!absl::GetFlag(FLAGS_data).empty()) {
    absl::Status s =
        ReportRealAccuracy(**classifier, absl::GetFlag(FLAGS_data));
    if (!s.ok()) return Fail(s);
  }
  const std::string eta =
      vdm::TraitsOf(options->sampler.type).takes_eta
          ? absl::StrFormat(", eta %g", options->sampler.eta)
          : std::string();
  std::printf(
      "sampling %ld per class: %s, %d steps%s, guidance %g, "
      "seed %lu, %d threads, %s\n",
      static_cast<long>(options->per_class),
      vdm::SamplerName(options->sampler.type).c_str(), options->sampler.steps,
      eta.c_str(), options->guidance,
      static_cast<unsigned long>(options->seed), at::get_num_threads(),
      vdm::PrecisionName((*model)->precision()).c_str());
  std::fflush(stdout);
  const absl::Time start = absl::Now();
  if (isatty(fileno(stderr))) {
    const int64_t per_class = options->per_class;
    options->progress = [start, per_class](int cls, int64_t done) {
      std::fprintf(stderr, "\rclass %d: %ld/%ld  (%.0f s)", cls,
                   static_cast<long>(done), static_cast<long>(per_class),
                   absl::ToDoubleSeconds(absl::Now() - start));
    };
  }
  absl::StatusOr<vdm::GuidedCheckResult> result =
      vdm::CheckGuidedSamples(**model, **classifier, *options);
  if (options->progress) std::fprintf(stderr, "\n");
  if (!result.ok()) return Fail(result.status());
  PrintResult(*result, (*classifier)->class_names());
  const double overall = result->Overall();
  std::printf(
      "overall=%.4f (%ld samples in %.0f s)\n", overall,
      static_cast<long>(options->per_class * (*classifier)->num_classes()),
      absl::ToDoubleSeconds(absl::Now() - start));
  if (overall < absl::GetFlag(FLAGS_require)) {
    std::printf("below --require=%g\n", absl::GetFlag(FLAGS_require));
    return 3;
  }
  return 0;
}
