// The samplers (model/vdm/samplers.h) against exact oracles (oracle.h):
// each must reproduce the known pixel distribution. TV distance between the
// histogram of 2,000 sampled 16-pixel images (32,000 pixels) and the true
// pmf; exact samples of that size score ~0.004 and the decoder's rounding of
// z_0 adds ~0.003, so the thresholds (0.03) sit well above the noise floor
// and well below what too few steps give (0.1-0.9, docs/oracle.md).
#include "model/vdm/samplers.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "model/vdm/diffusion.h"
#include "model/vdm/testing/oracle.h"

namespace vdm {
namespace {

constexpr int64_t kImages = 2000;

std::unique_ptr<OracleDenoiser> MakeOracle(OracleOptions o = {}) {
  return std::move(OracleDenoiser::Create(o)).value();
}

OracleOptions Conditional() {
  OracleOptions o;
  o.pmfs = {{0.7, 0.1, 0.1, 0.1}, {0.1, 0.1, 0.1, 0.7}, {0.1, 0.4, 0.4, 0.1}};
  return o;
}

at::Tensor Sample(Denoiser& model, SamplerConfig config, int64_t n = kImages,
                  uint64_t seed = 1, int64_t label = -1, double scale = 1.0) {
  SampleOptions o;
  o.sampler = config;
  o.num_images = n;
  o.seed = seed;
  o.conditioning.label = label;
  o.conditioning.guidance_scale = scale;
  auto x = SampleImages(model, o);
  EXPECT_TRUE(x.ok()) << x.status();
  return std::move(x).value();
}

struct Case {
  SamplerType type;
  double eta;
  int steps;      // the stated step count
  double max_tv;  // asserted at `steps`
  int few_steps;  // too few: TV well above the threshold
};

class SamplerTvTest : public ::testing::TestWithParam<Case> {};

TEST_P(SamplerTvTest, ReproducesTheOraclePmfOnAnySchedule) {
  const Case c = GetParam();
  auto oracle = MakeOracle();  // linear gamma: uniform t = uniform log-SNR
  const TimeGrid grid = TimeGrid::kUniformT;
  const double tv = PixelTvDistance(
      Sample(*oracle, {c.type, c.steps, c.eta, grid}), oracle->PixelPmf(0));
  EXPECT_LT(tv, c.max_tv) << SamplerName(c.type) << " " << c.steps;
  const double coarse =
      PixelTvDistance(Sample(*oracle, {c.type, c.few_steps, c.eta, grid}, 500),
                      oracle->PixelPmf(0));
  EXPECT_GT(coarse, 2 * c.max_tv) << "the measure must discriminate";
  // The network sees gamma only, so on a uniform log-SNR grid a warped
  // schedule samples exactly what the linear one does.
  OracleOptions o;
  o.schedule = OracleSchedule::kWarped;
  auto warped = MakeOracle(o);
  const SamplerConfig log_snr{c.type, 10, c.eta, TimeGrid::kUniformLogSnr};
  const at::Tensor a = Sample(*oracle, log_snr, 300);
  const at::Tensor b = Sample(*warped, log_snr, 300);
  EXPECT_GT((a == b).to(at::kDouble).mean().item<double>(), 0.999);
}

INSTANTIATE_TEST_SUITE_P(
    AllSamplers, SamplerTvTest,
    ::testing::Values(Case{SamplerType::kDdim, 0.0, 100, 0.03, 5},
                      Case{SamplerType::kDdim, 0.5, 100, 0.03, 5},
                      Case{SamplerType::kDdpm, 1.0, 100, 0.03, 5},
                      Case{SamplerType::kEulerMaruyama, 0.0, 50, 0.03, 10},
                      Case{SamplerType::kHeun, 0.0, 25, 0.03, 5},
                      Case{SamplerType::kDpmSolver2M, 0.0, 15, 0.03, 5}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return SamplerName(info.param.type) +
             (info.param.type == SamplerType::kDdim
                  ? "_eta" +
                        std::to_string(static_cast<int>(info.param.eta * 10))
                  : "");
    });

TEST(SamplerTest, UniformTGridAlsoConvergesOnAWarpedSchedule) {
  OracleOptions o;
  o.schedule = OracleSchedule::kWarped;
  auto oracle = MakeOracle(o);
  const double tv = PixelTvDistance(
      Sample(*oracle, {SamplerType::kDpmSolver2M, 50, 0, TimeGrid::kUniformT}),
      oracle->PixelPmf(0));
  EXPECT_LT(tv, 0.03);
}

TEST(SamplerTest, OdeSolversAgreeOnTheSameTrajectories) {
  // DDIM(0), Heun and DPM-Solver++ all integrate the probability-flow ODE:
  // from the same z1 they must land on (nearly) the same images.
  auto oracle = MakeOracle();
  const auto grid = TimeGrid::kUniformLogSnr;
  const at::Tensor ref =
      Sample(*oracle, {SamplerType::kDdim, 400, 0, grid}, 200);
  for (SamplerConfig c :
       {SamplerConfig{SamplerType::kHeun, 100, 0, grid},
        SamplerConfig{SamplerType::kDpmSolver2M, 100, 0, grid}}) {
    const at::Tensor x = Sample(*oracle, c, 200);
    const double same = (x == ref).to(at::kDouble).mean().item<double>();
    EXPECT_GT(same, 0.99) << SamplerName(c.type);
  }
}

TEST(SamplerTest, GuidanceScaleMovesFromMarginalToSharperClass) {
  auto oracle = MakeOracle(Conditional());
  const SamplerConfig solver{SamplerType::kDpmSolver2M, 20, 0,
                             TimeGrid::kUniformLogSnr};
  const at::Tensor marginal = oracle->PixelPmf(oracle->num_classes());
  const at::Tensor class0 = oracle->PixelPmf(0);
  const at::Tensor s0 = Sample(*oracle, solver, kImages, 2, 0, 0.0);
  const at::Tensor s1 = Sample(*oracle, solver, kImages, 2, 0, 1.0);
  const at::Tensor s3 = Sample(*oracle, solver, kImages, 2, 0, 3.0);
  // Exact samples of the mixture of this size score ~0.01-0.02: the class
  // of an image is shared by its 16 pixels, so they count less.
  EXPECT_LT(PixelTvDistance(s0, marginal), 0.05);
  EXPECT_LT(PixelTvDistance(s1, class0), 0.03);
  auto p0 = [&](const at::Tensor& x) {
    return oracle->ClassPosterior(x).select(1, 0).mean().item<double>();
  };
  EXPECT_NEAR(p0(s0), 1.0 / 3, 0.05);
  EXPECT_GT(p0(s1), 0.95);
  EXPECT_GT(p0(s3), p0(s1));
  // Sharper: the class's mode (value 40, p = 0.7) becomes more frequent.
  auto mode = [](const at::Tensor& x) {
    return (x == 40).to(at::kDouble).mean().item<double>();
  };
  EXPECT_NEAR(mode(s1), 0.7, 0.03);
  EXPECT_GT(mode(s3), 0.75);
}

// The fraction of pixels of `x` equal to `value`.
double Fraction(const at::Tensor& x, int value) {
  return (x == value).to(at::kDouble).mean().item<double>();
}

TEST(EditTest, NegativeGuidanceMovesMassAwayFromTheNegativeClass) {
  auto oracle = MakeOracle(Conditional());  // class 0 favours value 40
  const SamplerConfig ddim{SamplerType::kDdim, 50, 0.0, TimeGrid::kUniformT};
  const at::Tensor plain = Sample(*oracle, ddim, 1000, 3);
  SampleOptions o;
  o.sampler = ddim;
  o.num_images = 1000;
  o.seed = 3;
  o.conditioning.negative_label = 0;
  o.conditioning.guidance_scale = 2.0;
  const at::Tensor away = *SampleImages(*oracle, o);
  // Unconditional: P(40) = (0.7 + 0.1 + 0.1) / 3 = 0.3.
  EXPECT_NEAR(Fraction(plain, 40), 0.3, 0.03);
  EXPECT_LT(Fraction(away, 40), Fraction(plain, 40) - 0.1);
  // With a positive label: the negative one pulls further than "no label".
  o.conditioning.label = 2;
  o.conditioning.negative_label = 1;  // class 1 favours 220
  const at::Tensor toward_2 = *SampleImages(*oracle, o);
  o.conditioning.negative_label = -1;
  const at::Tensor plain_cfg = *SampleImages(*oracle, o);
  EXPECT_LT(Fraction(toward_2, 220), Fraction(plain_cfg, 220));
  // Guided pairs: 2 evaluations per image per step.
  SampleOptions bad = o;
  bad.conditioning.negative_label = 3;
  EXPECT_FALSE(SampleImages(*oracle, bad).ok()) << "label out of range";
}

TEST(EditTest, InpaintingKeepsTheKnownPixelsAndSamplesTheRestFromTheMarginal) {
  // Pixels are independent under the oracle, so the unknown pixels of an
  // inpainted image must follow the per-pixel marginal, whatever the
  // reference, and the known ones must be the reference's exactly.
  auto oracle = MakeOracle();
  at::Tensor reference = at::full({1, 1, 4, 4}, 40, at::kByte);
  reference.narrow(2, 0, 2).fill_(220);  // top half 220, bottom half 40
  at::Tensor known = at::zeros({1, 1, 4, 4}, at::kBool);
  known.narrow(3, 0, 2).fill_(true);  // the left half is known
  for (SamplerType type : {SamplerType::kDdpm, SamplerType::kHeun}) {
    SampleOptions o;
    o.sampler = {type, 40, 0.0, TimeGrid::kUniformT};
    o.num_images = 1000;
    o.seed = 9;
    o.edit.reference = reference;
    o.edit.known = known;
    const at::Tensor x = *SampleImages(*oracle, o);
    const at::Tensor expanded = reference.expand_as(x);
    EXPECT_TRUE(at::equal(x.masked_select(known.expand_as(x)),
                          expanded.masked_select(known.expand_as(x))))
        << SamplerName(type);
    const at::Tensor unknown = x.narrow(3, 2, 2).contiguous();
    EXPECT_LT(PixelTvDistance(unknown, oracle->PixelPmf(0)), 0.06)
        << SamplerName(type);
  }
}

// RePaint on a closed form: with the class-conditional oracle sampled
// without a label, the pixels are coupled through the class. Known pixels
// all 40 make class 0 certain (posterior 1 - 3e-7), so the exact
// conditional of every unknown pixel is class 0's pmf: P(40) = 0.7 (the
// marginal has 0.3). The replacement method alone under-uses the known
// pixels; resampling rounds must move the unknown pixels towards 0.7.
// Measured (DDPM, 1000 images): 50 steps: replacement 0.62, 1 round 0.68,
// 4 rounds 0.72; on a coarse grid resampling overshoots (20 steps: 0.59,
// 4 rounds 0.75, 9 rounds 0.77).
TEST(EditTest, ResamplingHarmonizesInpaintingTowardsTheExactConditional) {
  auto oracle = MakeOracle(Conditional());
  const at::Tensor reference = at::full({1, 1, 4, 4}, 40, at::kByte);
  at::Tensor known = at::zeros({1, 1, 4, 4}, at::kBool);
  known.narrow(3, 0, 2).fill_(true);  // the left half is known
  auto inpaint = [&](SamplerType type, int rounds, int64_t n) {
    SampleOptions o;
    o.sampler = {type, 50, 0.0, TimeGrid::kUniformT};
    o.sampler.resample_rounds = rounds;
    o.num_images = n;
    o.seed = 11;
    o.edit.reference = reference;
    o.edit.known = known;
    return SampleImages(*oracle, o);
  };
  const at::Tensor plain = *inpaint(SamplerType::kDdpm, 0, 1000);
  const at::Tensor repaint = *inpaint(SamplerType::kDdpm, 4, 1000);
  const double p_plain = Fraction(plain.narrow(3, 2, 2), 40);
  const double p_repaint = Fraction(repaint.narrow(3, 2, 2), 40);
  EXPECT_LT(p_plain, 0.7 - 0.05) << "replacement alone is biased";
  EXPECT_GT(p_repaint, p_plain + 0.05);
  EXPECT_LT(std::abs(p_repaint - 0.7), std::abs(p_plain - 0.7) / 2)
      << "plain " << p_plain << " repaint " << p_repaint;
  std::cout << "P(40) of the unknown pixels, exact 0.7: replacement "
            << p_plain << ", 4 resampling rounds " << p_repaint << "\n";
  for (const at::Tensor& x : {plain, repaint}) {
    EXPECT_TRUE(at::equal(x.narrow(3, 0, 2),
                          reference.narrow(3, 0, 2).expand({1000, 1, 4, 2})));
  }
  // Heun and Euler-Maruyama resample too; DPM-Solver++(2M) keeps a history
  // and is refused, as is resampling without a mask.
  EXPECT_TRUE(inpaint(SamplerType::kHeun, 2, 10).ok());
  EXPECT_TRUE(inpaint(SamplerType::kEulerMaruyama, 2, 10).ok());
  EXPECT_EQ(inpaint(SamplerType::kDpmSolver2M, 2, 10).status().code(),
            absl::StatusCode::kInvalidArgument);
  SampleOptions no_mask;
  no_mask.sampler.resample_rounds = 1;
  EXPECT_EQ(SampleImages(*oracle, no_mask).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EditTest, ResamplingCostsItsRoundsAndProgressesOncePerStep) {
  auto oracle = MakeOracle();
  at::Tensor known = at::zeros({1, 1, 4, 4}, at::kBool);
  known.narrow(2, 0, 1).fill_(true);
  for (SamplerType type : {SamplerType::kDdim, SamplerType::kHeun}) {
    SamplerConfig c{type, 6, 0.0, TimeGrid::kUniformT};
    c.resample_rounds = 3;
    SampleEdit edit;
    edit.reference = at::full({1, 1, 4, 4}, 100, at::kByte);
    edit.known = known;
    auto plan = *SamplingPlan::Create(c, 2, {}, {1, 4, 4}, 0, 5,
                                      ScheduleOf(*oracle), at::Tensor(), edit);
    int64_t evaluations = 0;
    std::vector<int> steps_seen;
    while (!plan->done()) {
      const Rows rows = plan->Next();
      ASSERT_TRUE(plan->Consume(*Evaluate(*oracle, rows)).ok());
      ++evaluations;
      steps_seen.push_back(plan->sampler().step());
    }
    // steps x evaluations per step x (1 + rounds) = SamplerEvaluations.
    EXPECT_EQ(evaluations, SamplerEvaluations(c)) << SamplerName(type);
    EXPECT_EQ(SamplerEvaluations(c),
              (type == SamplerType::kHeun ? 2 : 1) * 6 * 4);
    EXPECT_EQ(plan->sampler().evaluations(), evaluations);
    // The step count never runs ahead and ends at the last step.
    EXPECT_EQ(steps_seen.back(), 6);
    for (size_t i = 1; i < steps_seen.size(); ++i) {
      EXPECT_LE(steps_seen[i], steps_seen[i - 1] + 1);
    }
  }
}

// The exact latent of a pixel of value index j under the unconditional
// oracle. Pixels are independent, so the probability-flow ODE acts on each
// pixel alone: a monotone 1-D map carrying the CDF of q(z_0) to that of
// q(z_1). z_0 = alpha_0 f_j sits at the middle of its (tiny) mixture
// component, CDF P(< j) + p_j / 2, so its latent is F_1^{-1} of that, with
// F_1(z) = sum_k p_k Phi((z - alpha_1 f_k) / sigma_1). By bisection.
double ExactLatent(const OracleDenoiser& oracle, int j) {
  const auto& o = oracle.options();
  const double g1 = o.gamma_max;
  const double alpha1 = std::sqrt(1.0 / (1.0 + std::exp(g1)));
  const double sigma1 = std::sqrt(1.0 / (1.0 + std::exp(-g1)));
  const std::vector<double>& p = o.pmfs[0];
  double target = p[j] / 2;
  for (int k = 0; k < j; ++k) target += p[k];
  auto cdf = [&](double z) {
    double c = 0;
    for (size_t k = 0; k < p.size(); ++k) {
      const double f = 2.0 * (o.values[k] + 0.5) / 256.0 - 1.0;
      c += p[k] * 0.5 * std::erfc(-(z - alpha1 * f) / sigma1 / std::sqrt(2.0));
    }
    return c;
  };
  double lo = -10, hi = 10;
  for (int i = 0; i < 100; ++i) {
    const double mid = 0.5 * (lo + hi);
    (cdf(mid) < target ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

// DDIM inversion against the closed form above, and the round trip: the
// images of the oracle's data, encoded to t = 1 and decoded back with DDIM
// (eta = 0) on the same grid, come back with an error that shrinks with the
// steps.
TEST(EncodeTest, EncodeThenDecodeReconstructsWithErrorShrinkingInSteps) {
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(21);
  const at::Tensor x = oracle->Sample(300, 0, gen);
  at::Tensor exact = at::zeros(x.sizes(), at::kDouble);
  for (int j = 0; j < 4; ++j) {
    exact.masked_fill_(x == oracle->options().values[j],
                       ExactLatent(*oracle, j));
  }
  // Returns the mean absolute pixel error of the round trip; *latent_error
  // the largest deviation of a latent from the exact one.
  auto round_trip = [&](int steps, at::Tensor* latents, double* latent_error) {
    const SamplerConfig grid{SamplerType::kDdim, steps, 0.0,
                             TimeGrid::kUniformLogSnr};
    *latents = *EncodeImages(*oracle, x, grid);
    *latent_error =
        (latents->to(at::kDouble) - exact).abs().max().item<double>();
    SampleOptions o;
    o.sampler = grid;
    o.num_images = x.size(0);
    o.edit.z1 = *latents;
    const at::Tensor y = *SampleImages(*oracle, o);
    return (y.to(at::kDouble) - x.to(at::kDouble)).abs().mean().item<double>();
  };
  at::Tensor l3, l10, l200;
  double d3, d10, d200;
  const double e3 = round_trip(3, &l3, &d3), e10 = round_trip(10, &l10, &d10),
               e200 = round_trip(200, &l200, &d200);
  EXPECT_GT(e3, e10) << e3 << " " << e10 << " " << e200;
  EXPECT_GT(e3, 1.0) << "too few steps must show";
  EXPECT_LE(e200, e10);
  EXPECT_LT(e200, 0.01) << "mean absolute error in 0..255 at 200 steps";
  EXPECT_GT(d3, d10) << d3 << " " << d10 << " " << d200;
  EXPECT_GT(d10, d200);
  EXPECT_LT(d200, 0.05) << "the latents are the exact ones";
  std::cout << "round trip |x - x_hat| (0..255) at 3/10/200 steps: " << e3
            << " " << e10 << " " << e200 << "; largest latent error: " << d3
            << " " << d10 << " " << d200 << "\n";
  EXPECT_EQ(l200.sizes(), x.sizes());
  EXPECT_EQ(l200.scalar_type(), at::kFloat);
  // Decoding from a given z1 is sampling from that z1: a latent of N(0, I)
  // noise decodes to the seed's own DDIM sample when it is that seed's z1.
  SampleOptions seeded;
  seeded.sampler = {SamplerType::kDdim, 10, 0.0, TimeGrid::kUniformT};
  seeded.num_images = 4;
  seeded.seed = 3;
  at::Generator g3 = at::make_generator<at::CPUGeneratorImpl>(3);
  SampleOptions given = seeded;
  given.seed = 99;
  given.edit.z1 = at::randn({4, 1, 4, 4}, g3, at::kFloat);
  EXPECT_TRUE(at::equal(*SampleImages(*oracle, seeded),
                        *SampleImages(*oracle, given)));
  given.edit.z1 = at::zeros({3, 1, 4, 4});
  EXPECT_EQ(SampleImages(*oracle, given).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(EncodeImages(*oracle, at::zeros({2, 1, 4, 5}, at::kByte),
                         seeded.sampler)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EditTest, ImageToImageKeepsTheImageAtLowStrengthAndSamplesAtFull) {
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const at::Tensor reference = oracle->Sample(1, 0, gen);
  const SamplerConfig ddim{SamplerType::kDdim, 20, 0.0, TimeGrid::kUniformT};
  auto edit = [&](double strength) {
    SampleOptions o;
    o.sampler = ddim;
    o.num_images = 200;
    o.seed = 5;
    o.edit.reference = reference;
    o.edit.strength = strength;
    return *SampleImages(*oracle, o);
  };
  auto same = [&](const at::Tensor& x) {
    return (x == reference.expand_as(x)).to(at::kDouble).mean().item<double>();
  };
  // strength is the noise variance fraction sigma^2 of the start.
  const double low = same(edit(0.01)), mid = same(edit(0.5));
  const double full = same(edit(1.0));
  EXPECT_GT(low, 0.95) << "a small strength keeps the image";
  EXPECT_LT(mid, low);
  // Strength 1 is plain sampling: about the chance agreement of two draws.
  EXPECT_LT(full, 0.5);
  EXPECT_TRUE(at::equal(edit(1.0), Sample(*oracle, ddim, 200, 5)));
  SampleOptions bad;
  bad.sampler = ddim;
  bad.edit.strength = 0.5;  // no reference
  EXPECT_FALSE(SampleImages(*oracle, bad).ok());
  bad.edit.reference = reference;
  bad.edit.strength = 1.5;
  EXPECT_FALSE(SampleImages(*oracle, bad).ok());
}

TEST(EditTest, StrengthIsTheNoiseVarianceFractionOfTheStart) {
  for (OracleSchedule schedule : {OracleSchedule::kLinear, OracleSchedule::kWarped}) {
    OracleOptions o;
    o.schedule = schedule;
    auto oracle = MakeOracle(o);
    const ScheduleFn fn = ScheduleOf(*oracle);
    auto sigma2_at = [&](double t) {
      const GammaValues g = *fn(at::full({1}, t, at::kFloat));
      return 1.0 / (1.0 + std::exp(-g.gamma.item<double>()));
    };
    for (double s : {0.001, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99}) {
      SampleEdit edit;
      edit.strength = s;
      const absl::StatusOr<double> t = EditStartTime(edit, fn);
      ASSERT_TRUE(t.ok()) << t.status();
      EXPECT_GT(*t, 0.0);
      EXPECT_LT(*t, 1.0);
      EXPECT_NEAR(sigma2_at(*t), s, 1e-4 * s + 1e-6) << "t = " << *t;
      edit.strength_scale = SampleEdit::StrengthScale::kTime;
      EXPECT_EQ(*EditStartTime(edit, fn), s) << "the old scale: t itself";
    }
    SampleEdit edit;
    edit.strength = 1.0;
    EXPECT_EQ(*EditStartTime(edit, fn), 1.0);
    edit.strength = 1e-9;  // below sigma^2(0) = sigmoid(-13.3) = 1.7e-6
    EXPECT_EQ(*EditStartTime(edit, fn), kMinEditStartTime);
    for (double bad : {0.0, -0.1, 1.5, std::nan("")}) {
      edit.strength = bad;
      EXPECT_FALSE(EditStartTime(edit, fn).ok()) << bad;
    }
  }
  // On the linear schedule, in closed form: gamma(t) = logit(s).
  auto oracle = MakeOracle();
  SampleEdit edit;
  edit.strength = 0.5;  // logit 0: t = 13.3 / 18.3
  EXPECT_NEAR(*EditStartTime(edit, ScheduleOf(*oracle)), 13.3 / 18.3, 1e-6);
}

TEST(EditTest, EveryStrengthScaleAndSamplerStartsAtTheSameTime) {
  // An edit at strength s (sigma^2) is the edit at strength_t = t(s), for
  // every sampler: they all start their grid at that t.
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(4);
  const at::Tensor reference = oracle->Sample(1, 0, gen);
  SampleEdit by_noise;
  by_noise.reference = reference;
  by_noise.strength = 0.4;
  const double t = *EditStartTime(by_noise, ScheduleOf(*oracle));
  SampleEdit by_time = by_noise;
  by_time.strength = t;
  by_time.strength_scale = SampleEdit::StrengthScale::kTime;
  for (SamplerType type : {SamplerType::kDdim, SamplerType::kDdpm,
                           SamplerType::kEulerMaruyama, SamplerType::kHeun,
                           SamplerType::kDpmSolver2M}) {
    for (TimeGrid grid : {TimeGrid::kUniformT, TimeGrid::kUniformLogSnr}) {
      SampleOptions o;
      o.sampler = {type, 8, 0.0, grid};
      o.num_images = 20;
      o.seed = 7;
      o.edit = by_noise;
      const at::Tensor a = *SampleImages(*oracle, o);
      o.edit = by_time;
      const at::Tensor b = *SampleImages(*oracle, o);
      EXPECT_TRUE(at::equal(a, b)) << SamplerName(type);
    }
  }
}

TEST(SamplerTest, ParameterizationsGiveTheSameSamples) {
  auto oracle = MakeOracle();
  for (SamplerType type : {SamplerType::kDdpm, SamplerType::kDpmSolver2M}) {
    const SamplerConfig c{type, 20, 0, TimeGrid::kUniformT};
    const at::Tensor ref = Sample(*oracle, c, 500);
    for (const char* p : {"v", "x"}) {
      ParameterizedOracle model(oracle.get(), p);
      const at::Tensor x = Sample(model, c, 500);
      // float32 outputs: identical but for pixels on a rounding boundary.
      EXPECT_GT((x == ref).to(at::kDouble).mean().item<double>(), 0.999)
          << SamplerName(type) << " " << p;
    }
  }
}

const std::vector<SamplerType>& AllTypes() {
  static const auto* t = new std::vector<SamplerType>{
      SamplerType::kDdim, SamplerType::kDdpm, SamplerType::kEulerMaruyama,
      SamplerType::kHeun, SamplerType::kDpmSolver2M};
  return *t;
}

std::unique_ptr<Sampler> Make(OracleDenoiser& oracle, SamplerConfig c,
                              int64_t n, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const at::Tensor z1 = at::randn({n, 1, 4, 4}, gen, at::kFloat);
  auto s = MakeSampler(c, z1, ScheduleOf(oracle), gen);
  EXPECT_TRUE(s.ok()) << s.status();
  return std::move(s).value();
}

// Runs a sampler alone; returns its final z.
at::Tensor RunAlone(OracleDenoiser& oracle, Sampler& s) {
  while (!s.done()) {
    const Rows in = s.Next();
    const int64_t n = in.z.size(0);
    EXPECT_TRUE(
        s.Consume(
             oracle.Denoise(in.z, in.gamma, at::zeros({n}, at::kLong)).value())
            .ok());
  }
  return s.z();
}

TEST(SamplerStateTest, CountsEvaluationsAndFollowsItsGrid) {
  auto oracle = MakeOracle();
  const double g0 = oracle->options().gamma_min,
               g1 = oracle->options().gamma_max;
  for (SamplerType type : AllTypes()) {
    const SamplerConfig c{type, 7, 0.5, TimeGrid::kUniformT};
    auto s = Make(*oracle, c, 3, 4);
    EXPECT_NEAR(s->Next().gamma[0].item<float>(), g1, 1e-5);
    int64_t calls = 0;
    while (!s->done()) {
      const Rows in = s->Next();
      EXPECT_EQ(in.z.sizes(), (std::vector<int64_t>{3, 1, 4, 4}));
      EXPECT_EQ(in.gamma.sizes(), (std::vector<int64_t>{3}));
      ASSERT_TRUE(
          s->Consume(oracle->Denoise(in.z, in.gamma, at::zeros({3}, at::kLong))
                         .value())
              .ok());
      ++calls;
      EXPECT_TRUE(s->x_hat().defined());
    }
    EXPECT_EQ(calls, SamplerEvaluations(c)) << SamplerName(type);
    EXPECT_EQ(s->evaluations(), calls);
    EXPECT_EQ(s->step(), 7);
    EXPECT_NEAR(s->gammas()[-1].item<float>(), g0, 1e-5);
    EXPECT_EQ(s->Images().scalar_type(), at::kByte);
    EXPECT_EQ(s->Consume(at::zeros({3, 1, 4, 4})).code(),
              absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_EQ(SamplerEvaluations({SamplerType::kHeun, 10}), 20);
  EXPECT_EQ(SamplerEvaluations({SamplerType::kDpmSolver2M, 10}), 10);
  // Grids: the schedule at uniform t, or uniform in gamma between its ends.
  {
    OracleOptions o;
    o.schedule = OracleSchedule::kWarped;
    auto warped = MakeOracle(o);
    auto t =
        Make(*warped, {SamplerType::kDdim, 4, 0, TimeGrid::kUniformT}, 1, 1);
    const at::Tensor want =
        warped->Gamma(at::linspace(1.0, 0.0, 5, at::kFloat)).value().gamma;
    EXPECT_TRUE(at::allclose(t->gammas(), want));
    auto l = Make(*warped, {SamplerType::kDdim, 4, 0, TimeGrid::kUniformLogSnr},
                  1, 1);
    EXPECT_TRUE(at::allclose(
        l->gammas(), at::linspace(5.0, -13.3, 5, at::kFloat), 1e-5, 1e-5));
  }
}

TEST(SamplerStateTest, DdpmIsDdimWithEtaOneAndUsesDdimStep) {
  auto oracle = MakeOracle();
  const SamplerConfig ddpm{SamplerType::kDdpm, 6, 0, TimeGrid::kUniformT};
  const SamplerConfig ddim1{SamplerType::kDdim, 6, 1.0, TimeGrid::kUniformT};
  const at::Tensor a = RunAlone(*oracle, *Make(*oracle, ddpm, 4, 5));
  EXPECT_TRUE(at::equal(a, RunAlone(*oracle, *Make(*oracle, ddim1, 4, 5))));
  // By hand with DdimStep and the same generator.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(5);
  at::Tensor z = at::randn({4, 1, 4, 4}, gen, at::kFloat);
  const at::Tensor g =
      oracle->Gamma(at::linspace(1.0, 0.0, 7, at::kFloat)).value().gamma;
  for (int i = 0; i < 6; ++i) {
    const at::Tensor gt = g.narrow(0, i, 1), gs = g.narrow(0, i + 1, 1);
    const at::Tensor eps =
        oracle->Denoise(z, gt.expand({4}), at::zeros({4}, at::kLong)).value();
    z = DdimStep(z, eps, gt, gs, at::ones({1}),
                 at::randn(z.sizes(), gen, at::kFloat));
  }
  EXPECT_TRUE(at::allclose(a, z, 1e-6, 1e-6));
}

TEST(SamplerStateTest, RequestsSharingABatchGetTheirOwnResults) {
  // Two trajectories at different steps share every forward pass.
  auto oracle = MakeOracle();
  const SamplerConfig c1{SamplerType::kDdpm, 10, 0, TimeGrid::kUniformT};
  const SamplerConfig c2{SamplerType::kHeun, 4, 0, TimeGrid::kUniformLogSnr};
  auto a = Make(*oracle, c1, 3, 7);
  auto b = Make(*oracle, c2, 2, 8);
  while (!a->done() || !b->done()) {
    std::vector<Sampler*> live;
    for (Sampler* s : {a.get(), b.get()}) {
      if (!s->done()) live.push_back(s);
    }
    std::vector<at::Tensor> z, g;
    for (Sampler* s : live) {
      const Rows in = s->Next();
      z.push_back(in.z);
      g.push_back(in.gamma);
    }
    const at::Tensor zz = at::cat(z);
    const at::Tensor eps =
        oracle->Denoise(zz, at::cat(g), at::zeros({zz.size(0)}, at::kLong))
            .value();
    int64_t offset = 0;
    for (Sampler* s : live) {
      const int64_t n = s->z().size(0);
      ASSERT_TRUE(s->Consume(eps.narrow(0, offset, n)).ok());
      offset += n;
    }
  }
  // Up to float rounding: rows at other batch positions may round
  // differently under vectorized kernels.
  EXPECT_TRUE(at::allclose(a->z(), RunAlone(*oracle, *Make(*oracle, c1, 3, 7)),
                           1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(b->z(), RunAlone(*oracle, *Make(*oracle, c2, 2, 8)),
                           1e-5, 1e-5));
}

TEST(SamplerStateTest, RejectsBadInputAndParsesNames) {
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const at::Tensor z1 = at::randn({2, 1, 4, 4});
  const ScheduleFn schedule = ScheduleOf(*oracle);
  auto code = [&](SamplerConfig c, const at::Tensor& z, const ScheduleFn& f) {
    return MakeSampler(c, z, f, gen).status().code();
  };
  const auto kBad = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(code({SamplerType::kDdim, 0}, z1, schedule), kBad);
  EXPECT_EQ(code({SamplerType::kDdim, 5, 1.5}, z1, schedule), kBad);
  EXPECT_EQ(code({SamplerType::kDdim, 5, -0.1}, z1, schedule), kBad);
  EXPECT_EQ(code({SamplerType::kHeun, 5}, z1.flatten(1), schedule), kBad);
  const ScheduleFn decreasing = [&](const at::Tensor& t) {
    return oracle->Gamma(1.0 - t);
  };
  EXPECT_EQ(code({SamplerType::kDdim, 5}, z1, decreasing), kBad);
  const ScheduleFn failing =
      [](const at::Tensor&) -> absl::StatusOr<GammaValues> {
    return absl::InternalError("gamma failed");
  };
  EXPECT_EQ(code({SamplerType::kDdim, 5}, z1, failing),
            absl::StatusCode::kInternal);
  auto s = Make(*oracle, {SamplerType::kDdim, 3}, 2, 1);
  EXPECT_EQ(s->Consume(at::zeros({3, 1, 4, 4})).code(), kBad);
  // Names round-trip; unknown ones are refused.
  for (SamplerType type : AllTypes()) {
    EXPECT_EQ(ParseSamplerType(SamplerName(type)).value(), type);
  }
  EXPECT_FALSE(ParseSamplerType("euler").ok());
  for (TimeGrid grid : {TimeGrid::kUniformT, TimeGrid::kUniformLogSnr}) {
    EXPECT_EQ(ParseTimeGrid(TimeGridName(grid)).value(), grid);
  }
  EXPECT_FALSE(ParseTimeGrid("cosine").ok());
}

TEST(SamplerStateTest, TheTableSaysWhichSamplersResampleAndTakeEta) {
  auto oracle = MakeOracle();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  const at::Tensor z1 = at::randn({2, 1, 4, 4});
  SampleEdit edit;
  edit.reference = at::full({1, 1, 4, 4}, 100, at::kByte);
  edit.known = at::zeros({1, 1, 4, 4}, at::kBool);
  edit.known.narrow(2, 0, 1).fill_(true);
  for (SamplerType type : AllTypes()) {
    const SamplerTraits& traits = TraitsOf(type);
    EXPECT_EQ(traits.type, type);
    EXPECT_EQ(traits.name, SamplerName(type));
    // RePaint resampling: refused exactly for the multistep samplers.
    SamplerConfig repaint{type, 4, 0.0, TimeGrid::kUniformT};
    repaint.resample_rounds = 1;
    auto plan = SamplingPlan::Create(repaint, 2, {}, {1, 4, 4}, 0, 5,
                                     ScheduleOf(*oracle), at::Tensor(), edit);
    EXPECT_EQ(plan.ok(), !traits.multistep) << traits.name;
    // An eta out of range matters only to the samplers that take it.
    const SamplerConfig eta{type, 4, 1.5, TimeGrid::kUniformT};
    EXPECT_EQ(MakeSampler(eta, z1, ScheduleOf(*oracle), gen).ok(),
              !traits.takes_eta)
        << traits.name;
  }
  EXPECT_EQ(SamplerNameList(", ", [](const SamplerTraits& t) { return t.multistep; }),
            "dpm_solver_2m");
  EXPECT_EQ(SamplerNameList("|", [](const SamplerTraits& t) { return t.takes_eta; }),
            "ddim");
}

}  // namespace
}  // namespace vdm
