// Request validation (server/validation.h) without a server: every refusal
// is INVALID_ARGUMENT and its message starts with the field it is about
// ("steps: ..."), or says the request is too large and names the limit;
// accepted requests become the job they ask for.
#include "server/validation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "model/vdm/sampler_config.h"
#include "proto/convert.h"

namespace vdm {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

constexpr int kPixels = 28 * 28;

ModelDescription Conditional() {
  ModelDescription m;
  m.shape = {1, 28, 28};
  m.num_classes = 10;
  m.prediction = "eps";
  return m;
}

ModelDescription Unconditional() {
  ModelDescription m = Conditional();
  m.num_classes = 0;
  return m;
}

// INVALID_ARGUMENT whose message starts with "<field>: ".
void ExpectRefused(const absl::Status& status, const std::string& field) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), StartsWith(field + ": "));
}

// INVALID_ARGUMENT for a request that could never be admitted; the message
// names the limit and `part`, what to ask less of.
void ExpectTooLarge(const absl::Status& status, const std::string& part) {
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_THAT(std::string(status.message()), StartsWith("request too large"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("--max_queued_rows"));
  EXPECT_THAT(std::string(status.message()), HasSubstr(part));
}

v1::SampleRequest Sample() {
  v1::SampleRequest r;
  r.set_num_images(2);
  r.set_steps(4);
  r.set_seed(1);
  r.set_format(v1::IMAGE_FORMAT_RAW);
  return r;
}

// Inpainting: a raw image and a mask, white (known) on the top half.
v1::SampleRequest Inpaint() {
  v1::SampleRequest r = Sample();
  r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
  std::string mask(kPixels, '\0');
  for (int i = 0; i < kPixels / 2; ++i) mask[i] = '\xff';
  r.mutable_mask()->set_data(mask);
  return r;
}

v1::Latent* AddLatent(v1::SampleRequest* r) {
  v1::Latent* z = r->add_latents();
  for (int i = 0; i < kPixels; ++i) z->add_values(0.25f);
  z->set_channels(1);
  z->set_height(28);
  z->set_width(28);
  return z;
}

// Decoding: one latent, num_images unset.
v1::SampleRequest Decode() {
  v1::SampleRequest r = Sample();
  r.set_num_images(0);
  AddLatent(&r);
  return r;
}

absl::Status SampleStatus(const v1::SampleRequest& r,
                          const ModelDescription& model = Conditional(),
                          const RequestLimits& limits = {}) {
  return ToSampleJob(r, limits, model).status();
}

template <typename Request>
void AddImages(Request* r, int n) {
  for (int i = 0; i < n; ++i) {
    r->add_images()->set_data(std::string(kPixels, static_cast<char>(i)));
  }
}

v1::ScoreRequest Score(int n = 2) {
  v1::ScoreRequest r;
  r.set_format(v1::IMAGE_FORMAT_RAW);
  r.set_timesteps(4);
  r.set_seed(3);
  AddImages(&r, n);
  return r;
}

absl::Status ScoreStatus(const v1::ScoreRequest& r,
                         const ModelDescription& model = Conditional(),
                         const RequestLimits& limits = {}) {
  return ToScoreJob(r, limits, model).status();
}

v1::EncodeRequest Encode(int n = 2) {
  v1::EncodeRequest r;
  r.set_format(v1::IMAGE_FORMAT_RAW);
  r.set_steps(4);
  AddImages(&r, n);
  return r;
}

absl::Status EncodeStatus(const v1::EncodeRequest& r,
                          const ModelDescription& model = Conditional(),
                          const RequestLimits& limits = {}) {
  return ToEncodeJob(r, limits, model).status();
}

// ---- Sample: accepted -------------------------------------------------------

TEST(SampleValidationTest, AcceptsAPlainRequestWithTheDefaults) {
  v1::SampleRequest r;
  r.set_num_images(3);
  r.set_seed(42);
  const absl::StatusOr<SampleJob> job = ToSampleJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->num_images, 3);
  EXPECT_EQ(job->sampler.type, SamplerType::kDdim);
  EXPECT_EQ(job->sampler.grid, TimeGrid::kUniformT);
  EXPECT_EQ(job->sampler.steps, 50);
  EXPECT_EQ(job->sampler.eta, 0.0);
  EXPECT_EQ(job->sampler.resample_rounds, 0);
  EXPECT_EQ(job->conditioning.label, -1);
  EXPECT_EQ(job->conditioning.negative_label, -1);
  EXPECT_EQ(job->conditioning.guidance_scale, 1.0);
  EXPECT_EQ(job->seed, 42u);
  EXPECT_FALSE(job->reference.has_value());
  EXPECT_TRUE(job->known.empty());
  EXPECT_TRUE(job->latents.empty());
}

TEST(SampleValidationTest, AcceptsEverySamplerOfTheTable) {
  for (SamplerType type : AllSamplerTypes()) {
    v1::SampleRequest r = Sample();
    r.set_sampler(SamplerToProto(type));
    r.set_time_grid(v1::TIME_GRID_UNIFORM_LOG_SNR);
    if (TraitsOf(type).takes_eta) r.set_eta(0.5f);
    const absl::StatusOr<SampleJob> job = ToSampleJob(r, {}, Conditional());
    ASSERT_TRUE(job.ok()) << SamplerName(type) << ": " << job.status();
    EXPECT_EQ(job->sampler.type, type);
    EXPECT_EQ(job->sampler.grid, TimeGrid::kUniformLogSnr);
    EXPECT_EQ(job->sampler.eta, TraitsOf(type).takes_eta ? 0.5 : 0.0);
  }
}

TEST(SampleValidationTest, AcceptsGuidanceAndNegativeLabels) {
  v1::SampleRequest r = Sample();
  r.set_label(3);
  r.set_negative_label(5);
  r.set_guidance_scale(2.5f);
  const absl::StatusOr<SampleJob> job = ToSampleJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->conditioning.label, 3);
  EXPECT_EQ(job->conditioning.negative_label, 5);
  EXPECT_EQ(job->conditioning.guidance_scale, 2.5);
}

TEST(SampleValidationTest, AcceptsInpaintingWithResamplingAndThresholdsTheMask) {
  v1::SampleRequest r = Inpaint();
  r.set_resample_rounds(3);
  const absl::StatusOr<SampleJob> job = ToSampleJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(job->reference.has_value());
  EXPECT_EQ(job->reference->pixels, std::vector<uint8_t>(kPixels, 'x'));
  EXPECT_EQ(job->strength, 1.0);
  ASSERT_EQ(job->known.size(), static_cast<size_t>(kPixels));
  EXPECT_EQ(job->known[0], 1);
  EXPECT_EQ(job->known[kPixels - 1], 0);
  EXPECT_EQ(job->sampler.resample_rounds, 3);
}

TEST(SampleValidationTest, AcceptsImageToImageAndDecoding) {
  v1::SampleRequest edit = Sample();
  edit.mutable_init_image()->set_data(std::string(kPixels, 'x'));
  edit.set_strength(0.25f);
  const absl::StatusOr<SampleJob> edited = ToSampleJob(edit, {}, Conditional());
  ASSERT_TRUE(edited.ok()) << edited.status();
  EXPECT_EQ(edited->strength, 0.25);
  EXPECT_FALSE(edited->strength_is_time) << "strength is sigma^2";
  EXPECT_TRUE(edited->known.empty());
  v1::SampleRequest by_time = edit;
  by_time.clear_strength();
  by_time.set_strength_t(0.75f);
  const absl::StatusOr<SampleJob> timed = ToSampleJob(by_time, {}, Conditional());
  ASSERT_TRUE(timed.ok()) << timed.status();
  EXPECT_EQ(timed->strength, 0.75);
  EXPECT_TRUE(timed->strength_is_time);

  v1::SampleRequest decode = Decode();
  AddLatent(&decode);
  const absl::StatusOr<SampleJob> decoded =
      ToSampleJob(decode, {}, Conditional());
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->num_images, 2);
  ASSERT_EQ(decoded->latents.size(), 2u);
  EXPECT_EQ(decoded->latents[1], std::vector<float>(kPixels, 0.25f));
}

// ---- Sample: refused, one test per rule -------------------------------------

TEST(SampleValidationTest, RefusesNumImagesOutOfRange) {
  RequestLimits limits;
  limits.max_images_per_request = 8;
  for (int n : {0, -1, 9}) {
    v1::SampleRequest r = Sample();
    r.set_num_images(n);
    ExpectRefused(SampleStatus(r, Conditional(), limits), "num_images");
  }
}

TEST(SampleValidationTest, RefusesNumImagesOtherThanTheLatentCount) {
  v1::SampleRequest r = Decode();
  r.set_num_images(2);
  ExpectRefused(SampleStatus(r), "num_images");
}

TEST(SampleValidationTest, RefusesMoreLatentsThanTheImageLimit) {
  RequestLimits limits;
  limits.max_images_per_request = 2;
  v1::SampleRequest r = Decode();
  AddLatent(&r);
  AddLatent(&r);
  ExpectRefused(SampleStatus(r, Conditional(), limits), "latents");
}

TEST(SampleValidationTest, RefusesAnUnknownSampler) {
  v1::SampleRequest r = Sample();
  r.set_sampler(static_cast<v1::Sampler>(99));
  ExpectRefused(SampleStatus(r), "sampler");
}

TEST(SampleValidationTest, RefusesAnUnknownTimeGrid) {
  v1::SampleRequest r = Sample();
  r.set_time_grid(static_cast<v1::TimeGrid>(99));
  ExpectRefused(SampleStatus(r), "time_grid");
}

TEST(SampleValidationTest, RefusesStepsOutOfRange) {
  RequestLimits limits;
  limits.max_steps = 100;
  for (int steps : {-1, 101}) {
    v1::SampleRequest r = Sample();
    r.set_steps(steps);
    ExpectRefused(SampleStatus(r, Conditional(), limits), "steps");
  }
}

TEST(SampleValidationTest, RefusesEtaOutOfRange) {
  for (float eta : {-0.1f, 1.5f, std::numeric_limits<float>::quiet_NaN()}) {
    v1::SampleRequest r = Sample();
    r.set_eta(eta);
    ExpectRefused(SampleStatus(r), "eta");
  }
}

TEST(SampleValidationTest, RefusesEtaForEverySamplerThatTakesNone) {
  int refused = 0;
  for (SamplerType type : AllSamplerTypes()) {
    if (TraitsOf(type).takes_eta) continue;
    v1::SampleRequest r = Sample();
    r.set_sampler(SamplerToProto(type));
    r.set_eta(0.5f);
    const absl::Status s = SampleStatus(r);
    ExpectRefused(s, "eta");
    EXPECT_THAT(std::string(s.message()), HasSubstr(SamplerName(type)));
    ++refused;
  }
  EXPECT_GT(refused, 0);
}

TEST(SampleValidationTest, RefusesALabelOnAnUnconditionalModel) {
  v1::SampleRequest r = Sample();
  r.set_label(0);
  ExpectRefused(SampleStatus(r, Unconditional()), "label");
}

TEST(SampleValidationTest, RefusesALabelOutOfRange) {
  for (int label : {-1, 10}) {
    v1::SampleRequest r = Sample();
    r.set_label(label);
    ExpectRefused(SampleStatus(r), "label");
  }
}

TEST(SampleValidationTest, RefusesANegativeLabelOutOfRange) {
  v1::SampleRequest r = Sample();
  r.set_negative_label(12);
  r.set_guidance_scale(2.0f);
  ExpectRefused(SampleStatus(r), "negative_label");
}

TEST(SampleValidationTest, RefusesANegativeLabelEqualToTheLabel) {
  v1::SampleRequest r = Sample();
  r.set_label(3);
  r.set_negative_label(3);
  r.set_guidance_scale(2.0f);
  ExpectRefused(SampleStatus(r), "negative_label");
}

TEST(SampleValidationTest, RefusesANegativeLabelWithoutAGuidanceScale) {
  for (bool scale_one : {false, true}) {
    v1::SampleRequest r = Sample();
    r.set_negative_label(2);
    if (scale_one) r.set_guidance_scale(1.0f);
    ExpectRefused(SampleStatus(r), "guidance_scale");
  }
}

TEST(SampleValidationTest, RefusesAGuidanceScaleOutOfRange) {
  for (float g : {-1.0f, 20.5f, std::numeric_limits<float>::infinity()}) {
    v1::SampleRequest r = Sample();
    r.set_label(1);
    r.set_guidance_scale(g);
    ExpectRefused(SampleStatus(r), "guidance_scale");
  }
}

TEST(SampleValidationTest, RefusesGuidanceWithoutALabel) {
  v1::SampleRequest r = Sample();
  r.set_guidance_scale(3.0f);
  ExpectRefused(SampleStatus(r), "guidance_scale");
}

TEST(SampleValidationTest, RefusesAnUnknownFormat) {
  v1::SampleRequest r = Sample();
  r.set_format(static_cast<v1::ImageFormat>(99));
  ExpectRefused(SampleStatus(r), "format");
}

TEST(SampleValidationTest, RefusesAStrengthOutOfRange) {
  for (float strength : {0.0f, -0.5f, 1.5f}) {
    v1::SampleRequest r = Sample();
    r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
    r.set_strength(strength);
    ExpectRefused(SampleStatus(r), "strength");
  }
}

TEST(SampleValidationTest, RefusesAStrengthTOutOfRange) {
  for (float strength : {0.0f, -0.5f, 1.5f}) {
    v1::SampleRequest r = Sample();
    r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
    r.set_strength_t(strength);
    ExpectRefused(SampleStatus(r), "strength_t");
  }
}

TEST(SampleValidationTest, RefusesStrengthAndStrengthTTogether) {
  v1::SampleRequest r = Sample();
  r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
  r.set_strength(0.5f);
  r.set_strength_t(0.5f);
  ExpectRefused(SampleStatus(r), "strength_t");
  EXPECT_THAT(std::string(SampleStatus(r).message()),
              HasSubstr("give either strength"));
}

TEST(SampleValidationTest, RefusesAStrengthWithoutAnInitImage) {
  v1::SampleRequest r = Sample();
  r.set_strength(0.5f);
  ExpectRefused(SampleStatus(r), "strength");
  r.clear_strength();
  r.set_strength_t(0.5f);
  ExpectRefused(SampleStatus(r), "strength_t");
}

TEST(SampleValidationTest, RefusesAMaskWithoutAnInitImage) {
  v1::SampleRequest r = Sample();
  r.mutable_mask()->set_data(std::string(kPixels, 'x'));
  ExpectRefused(SampleStatus(r), "mask");
}

TEST(SampleValidationTest, RefusesAnInitImageWithoutAnEdit) {
  for (bool strength_one : {false, true}) {
    v1::SampleRequest r = Sample();
    r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
    if (strength_one) r.set_strength(1.0f);
    ExpectRefused(SampleStatus(r), "init_image");
  }
  v1::SampleRequest r = Sample();
  r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
  r.set_strength_t(1.0f);
  ExpectRefused(SampleStatus(r), "init_image");
}

TEST(SampleValidationTest, RefusesAnInitImageOfAnotherShape) {
  v1::SampleRequest r = Sample();
  r.mutable_init_image()->set_data(std::string(100, 'x'));
  r.set_strength(0.5f);
  ExpectRefused(SampleStatus(r), "init_image");
}

TEST(SampleValidationTest, RefusesAMaskOfAnotherShape) {
  v1::SampleRequest r = Inpaint();
  r.mutable_mask()->set_data(std::string(100, '\xff'));
  ExpectRefused(SampleStatus(r), "mask");
}

TEST(SampleValidationTest, RefusesDecodingWithAnythingButDeterministicDdim) {
  for (SamplerType type : AllSamplerTypes()) {
    if (type == SamplerType::kDdim) continue;
    v1::SampleRequest r = Decode();
    r.set_sampler(SamplerToProto(type));
    ExpectRefused(SampleStatus(r), "latents");
  }
  v1::SampleRequest r = Decode();
  r.set_eta(0.5f);
  ExpectRefused(SampleStatus(r), "latents");
}

TEST(SampleValidationTest, RefusesDecodingCombinedWithAnEdit) {
  v1::SampleRequest r = Decode();
  r.mutable_init_image()->set_data(std::string(kPixels, 'x'));
  r.set_strength(0.5f);
  ExpectRefused(SampleStatus(r), "latents");
}

TEST(SampleValidationTest, RefusesALatentOfAnotherShapeOrNotFinite) {
  v1::SampleRequest shape = Decode();
  shape.mutable_latents(0)->set_height(27);
  v1::SampleRequest count = Decode();
  count.mutable_latents(0)->add_values(0.0f);
  v1::SampleRequest infinite = Decode();
  infinite.mutable_latents(0)->set_values(
      5, std::numeric_limits<float>::infinity());
  for (const v1::SampleRequest& r : {shape, count, infinite}) {
    ExpectRefused(SampleStatus(r), "latents[0]");
  }
  v1::SampleRequest second = Decode();
  AddLatent(&second)->set_values(0, std::nanf(""));
  ExpectRefused(SampleStatus(second), "latents[1]");
}

TEST(SampleValidationTest, RefusesResampleRoundsOutOfRange) {
  for (int rounds : {-1, 11}) {
    v1::SampleRequest r = Inpaint();
    r.set_resample_rounds(rounds);
    ExpectRefused(SampleStatus(r), "resample_rounds");
  }
}

TEST(SampleValidationTest, RefusesResampleRoundsWithoutAMask) {
  v1::SampleRequest plain = Sample();
  plain.set_resample_rounds(2);
  v1::SampleRequest edit = Sample();  // image-to-image: no mask
  edit.mutable_init_image()->set_data(std::string(kPixels, 'x'));
  edit.set_strength(0.5f);
  edit.set_resample_rounds(2);
  for (const v1::SampleRequest& r : {plain, edit}) {
    ExpectRefused(SampleStatus(r), "resample_rounds");
  }
}

TEST(SampleValidationTest, RefusesResamplingWithEveryMultistepSampler) {
  for (SamplerType type : AllSamplerTypes()) {
    v1::SampleRequest r = Inpaint();
    r.set_sampler(SamplerToProto(type));
    r.set_resample_rounds(1);
    const absl::Status s = SampleStatus(r);
    if (!TraitsOf(type).multistep) {
      EXPECT_TRUE(s.ok()) << SamplerName(type) << ": " << s;
      continue;
    }
    ExpectRefused(s, "resample_rounds");
    EXPECT_THAT(std::string(s.message()), HasSubstr(SamplerName(type)));
  }
}

TEST(SampleValidationTest, RefusesARequestThatCouldNeverBeAdmitted) {
  RequestLimits limits;
  limits.max_request_rows = 100;
  v1::SampleRequest r = Sample();  // 2 images x 50 steps = 100 rows: fits
  r.set_steps(50);
  EXPECT_TRUE(SampleStatus(r, Conditional(), limits).ok());
  r.set_steps(51);
  ExpectTooLarge(SampleStatus(r, Conditional(), limits), "steps");
  r.set_steps(25);  // guided: 2 rows per image
  r.set_label(1);
  r.set_guidance_scale(3.0f);
  EXPECT_TRUE(SampleStatus(r, Conditional(), limits).ok());
  r.set_steps(26);
  ExpectTooLarge(SampleStatus(r, Conditional(), limits), "guidance");
}

// ---- Encode -----------------------------------------------------------------

TEST(EncodeValidationTest, AcceptsImagesWithTheDefaults) {
  v1::EncodeRequest r = Encode(3);
  r.set_steps(0);
  r.set_label(4);
  const absl::StatusOr<EncodeJob> job = ToEncodeJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->images.size(), 3u);
  EXPECT_EQ(job->images[2].pixels, std::vector<uint8_t>(kPixels, 2));
  EXPECT_EQ(job->sampler.steps, 50);
  EXPECT_EQ(job->sampler.grid, TimeGrid::kUniformT);
  EXPECT_EQ(job->label, 4);
}

TEST(EncodeValidationTest, RefusesNoImagesOrTooMany) {
  RequestLimits limits;
  limits.max_images_per_request = 2;
  ExpectRefused(EncodeStatus(Encode(0), Conditional(), limits), "images");
  ExpectRefused(EncodeStatus(Encode(3), Conditional(), limits), "images");
}

TEST(EncodeValidationTest, RefusesAnUnknownFormat) {
  v1::EncodeRequest r = Encode();
  r.set_format(static_cast<v1::ImageFormat>(99));
  ExpectRefused(EncodeStatus(r), "format");
}

TEST(EncodeValidationTest, RefusesStepsOutOfRange) {
  for (int steps : {-1, 1001}) {
    v1::EncodeRequest r = Encode();
    r.set_steps(steps);
    ExpectRefused(EncodeStatus(r), "steps");
  }
}

TEST(EncodeValidationTest, RefusesAnUnknownTimeGrid) {
  v1::EncodeRequest r = Encode();
  r.set_time_grid(static_cast<v1::TimeGrid>(99));
  ExpectRefused(EncodeStatus(r), "time_grid");
}

TEST(EncodeValidationTest, RefusesALabelOutOfRangeOrOnAnUnconditionalModel) {
  v1::EncodeRequest r = Encode();
  r.set_label(10);
  ExpectRefused(EncodeStatus(r), "label");
  r.set_label(0);
  ExpectRefused(EncodeStatus(r, Unconditional()), "label");
}

TEST(EncodeValidationTest, RefusesAnImageOfAnotherShape) {
  v1::EncodeRequest r = Encode();
  r.mutable_images(1)->set_data("tiny");
  ExpectRefused(EncodeStatus(r), "images[1]");
}

TEST(EncodeValidationTest, RefusesARequestThatCouldNeverBeAdmitted) {
  RequestLimits limits;
  limits.max_request_rows = 8;
  v1::EncodeRequest r = Encode();  // 2 images x 4 steps = 8 rows: fits
  EXPECT_TRUE(EncodeStatus(r, Conditional(), limits).ok());
  r.set_steps(5);
  ExpectTooLarge(EncodeStatus(r, Conditional(), limits), "steps");
}

// ---- ScoreBPD ---------------------------------------------------------------

TEST(ScoreValidationTest, AcceptsImagesWithTheDefaults) {
  v1::ScoreRequest r = Score(2);
  r.set_timesteps(0);
  r.set_shared_noise(true);
  r.set_anomaly_map(true);
  r.set_false_positive_rate(0.5f);
  const absl::StatusOr<ScoreJob> job = ToScoreJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->images.size(), 2u);
  EXPECT_EQ(job->timesteps, 16);
  EXPECT_EQ(job->seed, 3u);
  EXPECT_EQ(job->label, -1);
  EXPECT_TRUE(job->shared_noise);
  EXPECT_TRUE(job->pixel_map);
  EXPECT_EQ(job->method, ScoreMethod::kElbo);
}

TEST(ScoreValidationTest, AcceptsTheOdeWithItsDefaults) {
  v1::ScoreRequest r = Score(1);
  r.set_method(v1::SCORE_METHOD_ODE);
  const absl::StatusOr<ScoreJob> job = ToScoreJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->method, ScoreMethod::kOde);
  EXPECT_EQ(job->ode.solver, OdeSolver::kDormandPrince);
  EXPECT_EQ(job->ode.rtol, kDefaultOdeRtol);
  EXPECT_EQ(job->ode.atol, kDefaultOdeAtol);
  EXPECT_EQ(job->ode.max_evaluations, kDefaultOdeMaxEvaluations);
  EXPECT_EQ(job->ode.dequantization, Dequantization::kGaussian);
  EXPECT_EQ(job->ode.trace_samples, 1);
}

TEST(ScoreValidationTest, TakesTheOdeOptionsItIsGiven) {
  v1::ScoreRequest r = Score(1);
  r.set_method(v1::SCORE_METHOD_ODE);
  r.set_ode_rtol(1e-4);
  r.set_ode_atol(2e-5);
  r.set_ode_max_evaluations(1000);
  r.set_dequantization(v1::DEQUANTIZATION_UNIFORM);
  r.set_trace_samples(3);
  absl::StatusOr<ScoreJob> job = ToScoreJob(r, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->ode.rtol, 1e-4);
  EXPECT_EQ(job->ode.atol, 2e-5);
  EXPECT_EQ(job->ode.max_evaluations, 1000);
  EXPECT_EQ(job->ode.dequantization, Dequantization::kUniform);
  EXPECT_EQ(job->ode.trace_samples, 3);
  // ode_steps picks RK4 with that many steps.
  v1::ScoreRequest rk4 = Score(1);
  rk4.set_method(v1::SCORE_METHOD_ODE);
  rk4.set_ode_steps(12);
  job = ToScoreJob(rk4, {}, Conditional());
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->ode.solver, OdeSolver::kRk4);
  EXPECT_EQ(job->ode.steps, 12);
}

TEST(ScoreValidationTest, RefusesAdaptiveOptionsOutOfRangeOrWithRk4) {
  auto ode = [] {
    v1::ScoreRequest r = Score(1);
    r.set_method(v1::SCORE_METHOD_ODE);
    return r;
  };
  for (double tol : {-1e-3, 1e-9, 0.5, std::numeric_limits<double>::quiet_NaN()}) {
    v1::ScoreRequest r = ode();
    r.set_ode_rtol(tol);
    ExpectRefused(ScoreStatus(r), "ode_rtol");
    r = ode();
    r.set_ode_atol(tol);
    ExpectRefused(ScoreStatus(r), "ode_atol");
  }
  for (int evals : {-1, kMinOdeEvaluations - 1, kMaxOdeEvaluations + 1}) {
    v1::ScoreRequest r = ode();
    r.set_ode_max_evaluations(evals);
    ExpectRefused(ScoreStatus(r), "ode_max_evaluations");
  }
  v1::ScoreRequest r = ode();
  r.set_dequantization(static_cast<v1::Dequantization>(9));
  ExpectRefused(ScoreStatus(r), "dequantization");
  // A tolerance means the adaptive solver; ode_steps means RK4.
  r = ode();
  r.set_ode_steps(8);
  r.set_ode_rtol(1e-4);
  ExpectRefused(ScoreStatus(r), "ode_rtol");
  r = ode();
  r.set_ode_steps(8);
  r.set_ode_max_evaluations(100);
  ExpectRefused(ScoreStatus(r), "ode_max_evaluations");
}

TEST(ScoreValidationTest, RefusesNoImagesOrTooMany) {
  RequestLimits limits;
  limits.max_images_per_request = 2;
  ExpectRefused(ScoreStatus(Score(0), Conditional(), limits), "images");
  ExpectRefused(ScoreStatus(Score(3), Conditional(), limits), "images");
}

TEST(ScoreValidationTest, RefusesAnUnknownFormat) {
  v1::ScoreRequest r = Score();
  r.set_format(static_cast<v1::ImageFormat>(99));
  ExpectRefused(ScoreStatus(r), "format");
}

TEST(ScoreValidationTest, RefusesTimestepsOutOfRange) {
  RequestLimits limits;
  limits.max_timesteps = 64;
  for (int k : {1, -2, 65}) {
    v1::ScoreRequest r = Score();
    r.set_timesteps(k);
    ExpectRefused(ScoreStatus(r, Conditional(), limits), "timesteps");
  }
}

TEST(ScoreValidationTest, RefusesALabelOutOfRangeOrOnAnUnconditionalModel) {
  v1::ScoreRequest r = Score();
  r.set_label(-3);
  ExpectRefused(ScoreStatus(r), "label");
  r.set_label(1);
  ExpectRefused(ScoreStatus(r, Unconditional()), "label");
}

TEST(ScoreValidationTest, RefusesAnUnknownMethod) {
  v1::ScoreRequest r = Score();
  r.set_method(static_cast<v1::ScoreMethod>(7));
  ExpectRefused(ScoreStatus(r), "method");
}

TEST(ScoreValidationTest, RefusesOdeStepsOutOfRange) {
  for (int steps : {-1, kMaxOdeSteps + 1}) {
    v1::ScoreRequest r = Score(1);
    r.set_method(v1::SCORE_METHOD_ODE);
    r.set_ode_steps(steps);
    ExpectRefused(ScoreStatus(r), "ode_steps");
  }
}

TEST(ScoreValidationTest, RefusesTraceSamplesOutOfRange) {
  for (int probes : {-2, kMaxTraceSamples + 1}) {
    v1::ScoreRequest r = Score(1);
    r.set_method(v1::SCORE_METHOD_ODE);
    r.set_ode_steps(1);
    r.set_trace_samples(probes);
    ExpectRefused(ScoreStatus(r), "trace_samples");
  }
}

TEST(ScoreValidationTest, RefusesOdeOptionsWithoutTheOde) {
  for (v1::ScoreMethod method :
       {v1::SCORE_METHOD_UNSPECIFIED, v1::SCORE_METHOD_ELBO}) {
    v1::ScoreRequest steps = Score();
    steps.set_method(method);
    steps.set_ode_steps(4);
    ExpectRefused(ScoreStatus(steps), "ode_steps");
    v1::ScoreRequest probes = Score();
    probes.set_method(method);
    probes.set_trace_samples(2);
    ExpectRefused(ScoreStatus(probes), "trace_samples");
    v1::ScoreRequest tol = Score();
    tol.set_method(method);
    tol.set_ode_atol(1e-3);
    ExpectRefused(ScoreStatus(tol), "ode_atol");
    v1::ScoreRequest deq = Score();
    deq.set_method(method);
    deq.set_dequantization(v1::DEQUANTIZATION_UNIFORM);
    ExpectRefused(ScoreStatus(deq), "dequantization");
  }
}

TEST(ScoreValidationTest, RefusesAnImageOfAnotherShapeOrABadPng) {
  v1::ScoreRequest raw = Score();
  raw.mutable_images(1)->set_data("tiny");
  ExpectRefused(ScoreStatus(raw), "images[1]");
  v1::ScoreRequest png = Score(1);
  png.set_format(v1::IMAGE_FORMAT_PNG);
  ExpectRefused(ScoreStatus(png), "images[0]");
}

TEST(ScoreValidationTest, RefusesAFalsePositiveRateOutOfRange) {
  for (float rate :
       {0.0f, -0.1f, 0.7f, std::numeric_limits<float>::quiet_NaN()}) {
    v1::ScoreRequest r = Score();
    r.set_false_positive_rate(rate);
    ExpectRefused(ScoreStatus(r), "false_positive_rate");
  }
}

TEST(ScoreValidationTest, RefusesARequestThatCouldNeverBeAdmitted) {
  RequestLimits limits;
  limits.max_request_rows = 8;
  v1::ScoreRequest elbo = Score();  // 2 images x K = 4: 8 rows, fits
  EXPECT_TRUE(ScoreStatus(elbo, Conditional(), limits).ok());
  elbo.set_timesteps(5);
  ExpectTooLarge(ScoreStatus(elbo, Conditional(), limits), "timesteps");
  // The ODE: 1 image x 2 probes x 4 x ode_steps rows.
  v1::ScoreRequest ode = Score(1);
  ode.set_method(v1::SCORE_METHOD_ODE);
  ode.set_ode_steps(1);
  ode.set_trace_samples(2);
  EXPECT_TRUE(ScoreStatus(ode, Conditional(), limits).ok());
  ode.set_ode_steps(2);
  ExpectTooLarge(ScoreStatus(ode, Conditional(), limits), "ode_steps");
  // The adaptive solver is admitted by its cap: 1 x 1 x 13 rows at most.
  limits.max_request_rows = kMinOdeEvaluations;
  v1::ScoreRequest adaptive = Score(1);
  adaptive.set_method(v1::SCORE_METHOD_ODE);
  adaptive.set_ode_max_evaluations(kMinOdeEvaluations);
  EXPECT_TRUE(ScoreStatus(adaptive, Conditional(), limits).ok());
  adaptive.set_ode_max_evaluations(kMinOdeEvaluations + 1);
  ExpectTooLarge(ScoreStatus(adaptive, Conditional(), limits),
                 "ode_max_evaluations");
}

}  // namespace
}  // namespace vdm
