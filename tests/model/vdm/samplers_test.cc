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

#include <string>

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
  const double low = same(edit(0.2)), mid = same(edit(0.6));
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
  EXPECT_TRUE(at::equal(a->z(), RunAlone(*oracle, *Make(*oracle, c1, 3, 7))));
  EXPECT_TRUE(at::equal(b->z(), RunAlone(*oracle, *Make(*oracle, c2, 2, 8))));
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

}  // namespace
}  // namespace vdm
