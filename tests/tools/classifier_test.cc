// The Fashion-MNIST classifier shipped in model/checkpoints/classifier.pt
// (model/net/classifier.py) and the guided-sample check of vdm-classify
// (tools/classifier.h).
#include "tools/classifier.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "model/train/dataset.h"
#include "model/vdm/feature_model.h"
#include "model/vdm/torchscript_model.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;

const std::string kClassifier =
    std::string(VDM_SOURCE_DIR) + "/model/checkpoints/classifier.pt";
const std::string kFashionMnist = "/usr/share/datasets/fashion-mnist";
const std::string kTinyModel = std::string(VDM_TEST_MODELS_DIR) + "/tiny.pt";

TEST(ImageClassifierTest, ClassifiesRealTestImages) {
  ASSERT_TRUE(std::filesystem::exists(kFashionMnist))
      << kFashionMnist << " is missing: install dataset-fashion-mnist "
      << "(scripts/install-deps.sh)";
  auto classifier = ImageClassifier::Load(kClassifier);
  ASSERT_TRUE(classifier.ok()) << classifier.status();
  EXPECT_EQ((*classifier)->num_classes(), 10);
  EXPECT_EQ((*classifier)->class_names()[9], "Ankle boot");
  EXPECT_GT((*classifier)->recorded_accuracy(), 0.85);
  // The first 2,000 of the 10,000 test images (about a second).
  auto test = LoadIdxDataset(kFashionMnist, "t10k", (*classifier)->shape(), 10,
                             /*limit=*/2000);
  ASSERT_TRUE(test.ok()) << test.status();
  auto predicted = (*classifier)->Classify(test->images, /*batch=*/250);
  ASSERT_TRUE(predicted.ok()) << predicted.status();
  const double accuracy =
      predicted->eq(test->labels).to(at::kDouble).mean().item<double>();
  EXPECT_GT(accuracy, 0.85);
  // Every class is predicted (not one dominant answer).
  EXPECT_EQ(at::bincount(*predicted, {}, 10).gt(100).sum().item<int64_t>(), 10);
}

TEST(ImageClassifierTest, FeaturesPlaceTheSameClassCloserThanOthers) {
  // The penultimate features (the feature-kNN baseline's space), read as
  // vdm-ood-eval and the thorough level read them (FeatureModel): a test
  // image's nearest other image is more often of its own class than not.
  auto classifier = FeatureModel::Load(kClassifier);
  ASSERT_TRUE(classifier.ok()) << classifier.status();
  auto test = LoadIdxDataset(kFashionMnist, "t10k", (*classifier)->shape(), 10,
                             /*limit=*/400);
  ASSERT_TRUE(test.ok()) << test.status();
  auto features = (*classifier)->Features(test->images, /*batch=*/100);
  ASSERT_TRUE(features.ok()) << features.status();
  ASSERT_EQ(features->size(0), 400);
  ASSERT_EQ(features->size(1), 128);
  at::Tensor d = at::cdist(*features, *features);
  d.fill_diagonal_(1e30);
  const at::Tensor nearest = d.argmin(1);
  const double same = test->labels.index_select(0, nearest)
                          .eq(test->labels).to(at::kDouble).mean().item<double>();
  EXPECT_GT(same, 0.7) << "nearest neighbours share the class";
  auto vdm = FeatureModel::Load(kTinyModel);
  EXPECT_FALSE(vdm.ok()) << "a VDM is not a classifier, features or not";
}

TEST(ImageClassifierTest, RefusesAModelThatIsNotAClassifier) {
  auto missing = ImageClassifier::Load("/nonexistent/classifier.pt");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(missing.status().message(), HasSubstr("cannot load classifier"));
  // A VDM has the attributes but forward(z, gamma, label) takes three inputs.
  auto vdm = ImageClassifier::Load(kTinyModel);
  ASSERT_FALSE(vdm.ok());
  EXPECT_THAT(vdm.status().message(), HasSubstr("forward"));
}

TEST(ImageClassifierTest, RejectsImagesOfTheWrongShape) {
  auto classifier = ImageClassifier::Load(kClassifier);
  ASSERT_TRUE(classifier.ok()) << classifier.status();
  auto r = (*classifier)->Classify(at::zeros({2, 1, 32, 32}, at::kByte));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("[N,1,28,28]"));
}

TEST(CheckGuidedSamplesTest, CountsEverySampleOnceAndIsDeterministic) {
  auto classifier = ImageClassifier::Load(kClassifier);
  ASSERT_TRUE(classifier.ok()) << classifier.status();
  TorchScriptModel::Options o;
  o.path = kTinyModel;
  auto model = TorchScriptModel::Load(o);
  ASSERT_TRUE(model.ok()) << model.status();
  GuidedCheckOptions options;
  options.per_class = 3;
  options.batch = 2;  // two sampling calls per class
  options.sampler.steps = 3;
  int calls = 0;
  options.progress = [&](int, int64_t) { ++calls; };
  auto a = CheckGuidedSamples(**model, **classifier, options);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(calls, 20);
  ASSERT_EQ(a->confusion.size(), 10u);
  int64_t right = 0;
  for (int c = 0; c < 10; ++c) {
    int64_t row = 0;
    for (int64_t n : a->confusion[c]) row += n;
    EXPECT_EQ(row, 3) << "class " << c;
    right += a->confusion[c][c];
    EXPECT_GE(a->Fraction(c), 0.0);
    EXPECT_LE(a->Fraction(c), 1.0);
  }
  EXPECT_DOUBLE_EQ(a->Overall(), right / 30.0);
  options.progress = nullptr;
  auto b = CheckGuidedSamples(**model, **classifier, options);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->confusion, b->confusion);
}

TEST(CheckGuidedSamplesTest, RefusesAMismatchedGenerator) {
  auto classifier = ImageClassifier::Load(kClassifier);
  ASSERT_TRUE(classifier.ok()) << classifier.status();
  TorchScriptModel::Options o;
  o.path = std::string(VDM_TEST_MODELS_DIR) + "/tiny_uncond_v.pt";
  auto model = TorchScriptModel::Load(o);
  ASSERT_TRUE(model.ok()) << model.status();
  auto r = CheckGuidedSamples(**model, **classifier, GuidedCheckOptions());
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("0 classes"));
}

}  // namespace
}  // namespace vdm
