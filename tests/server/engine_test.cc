// The engine's batching rules, proved on a fake Denoiser that records every
// forward pass, in manual mode (no threads: the test drives each iteration
// with Engine::Step) and on a FakeClock (no sleeping). Every request gets a
// label of its own, so the labels of a batch say which request each row came
// from; "no label" (10) marks the unconditional half of a guided pair.
#include "server/engine.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "model/vdm/denoiser.h"
#include "model/vdm/ode_likelihood.h"
#include "model/vdm/samplers.h"
#include "model/vdm/tensor_image.h"
#include "server/tasks.h"
#include "server/testing/fake_clock.h"

namespace vdm {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;

constexpr int kClasses = 10;  // label 10 = "no label"

// The engine's one Submit with each kind of task.
absl::Status SubmitSample(Engine& engine, SampleJob job,
                          RequestControl control, SampleCallback done) {
  return engine.Submit(MakeSampleTask(std::move(job), kClasses, std::move(done)),
                       std::move(control));
}
absl::Status SubmitScore(Engine& engine, ScoreJob job, RequestControl control,
                         ScoreCallback done) {
  return engine.Submit(MakeScoreTask(std::move(job), std::move(done)),
                       std::move(control));
}
absl::Status SubmitEncode(Engine& engine, EncodeJob job,
                          RequestControl control, EncodeCallback done) {
  return engine.Submit(MakeEncodeTask(std::move(job), std::move(done)),
                       std::move(control));
}

// One forward pass as the fake saw it.
struct Batch {
  std::vector<int64_t> labels;
  std::vector<float> gammas;
  bool vjp = false;  // a forward + VJP pass (DenoiseVjp)
  int threads = 0;   // at::get_num_threads() on the forward's thread
};

// A deterministic stand-in network: eps_hat = 0.1 z + 0.01 label, on a
// linear schedule gamma(t) = -5 + 10 t. Each forward pass costs
// `fixed + per_row * rows` on the fake clock (if any). Records every batch.
class FakeDenoiser : public Denoiser {
 public:
  explicit FakeDenoiser(FakeClock* clock = nullptr,
                        absl::Duration fixed = absl::ZeroDuration(),
                        absl::Duration per_row = absl::ZeroDuration())
      : clock_(clock), fixed_(fixed), per_row_(per_row) {}

  ImageShape shape() const override { return {1, 2, 2}; }
  int num_classes() const override { return kClasses; }

  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override {
    Batch b;
    const at::Tensor l = label.contiguous();
    const at::Tensor g = gamma.contiguous().to(at::kFloat);
    b.labels.assign(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + l.numel());
    b.gammas.assign(g.data_ptr<float>(), g.data_ptr<float>() + g.numel());
    b.threads = at::get_num_threads();
    {
      absl::MutexLock lock(&mu_);
      batches_.push_back(std::move(b));
      forward_thread_ = std::this_thread::get_id();
    }
    if (clock_ != nullptr) clock_->Advance(fixed_ + per_row_ * z.size(0));
    return slope_ * z + 0.01 * label.to(at::kFloat).view({-1, 1, 1, 1});
  }

  // eps_hat = slope z + 0.01 label (a different network, for a background
  // model).
  void set_slope(double slope) { slope_ = slope; }
  // J = d eps / d z = slope I, so v^T J = slope v.
  absl::StatusOr<EpsVjp> DenoiseVjp(const at::Tensor& z,
                                    const at::Tensor& gamma,
                                    const at::Tensor& label,
                                    const at::Tensor& v) override {
    absl::StatusOr<at::Tensor> eps = Denoise(z, gamma, label);
    if (!eps.ok()) return eps.status();
    {
      absl::MutexLock lock(&mu_);
      batches_.back().vjp = true;
    }
    return EpsVjp{*eps, slope_ * v};
  }

  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override {
    return GammaValues{-5.0 + 10.0 * t, at::full_like(t, 10.0)};
  }

  std::vector<Batch> batches() const {
    absl::MutexLock lock(&mu_);
    return batches_;
  }
  std::thread::id forward_thread() const {
    absl::MutexLock lock(&mu_);
    return forward_thread_;
  }

 private:
  FakeClock* const clock_;
  const absl::Duration fixed_, per_row_;
  double slope_ = 0.1;
  mutable absl::Mutex mu_;
  std::vector<Batch> batches_ ABSL_GUARDED_BY(mu_);
  std::thread::id forward_thread_ ABSL_GUARDED_BY(mu_);
};

SampleJob Sample(int n, int steps, int label, double scale = 1.0,
                 SamplerType type = SamplerType::kDdim) {
  SampleJob job;
  job.num_images = n;
  job.sampler.type = type;
  job.sampler.steps = steps;
  job.conditioning.label = label;
  job.conditioning.guidance_scale = scale;
  job.seed = 1000 + label;
  return job;
}

ScoreJob Score(int n, int k, int label) {
  ScoreJob job;
  for (int i = 0; i < n; ++i) {
    job.images.push_back(
        {1, 2, 2, {uint8_t(10 * i), 100, 200, uint8_t(255 - i)}});
  }
  job.timesteps = k;
  job.label = label;
  job.seed = 7;
  return job;
}

// What a callback delivered.
template <typename Result>
struct Outcome {
  int calls = 0;
  absl::StatusOr<Result> result = absl::UnknownError("not called");
  std::function<void(absl::StatusOr<Result>)> Callback() {
    return [this](absl::StatusOr<Result> r) {
      ++calls;
      result = std::move(r);
    };
  }
};

class EngineTest : public ::testing::Test {
 protected:
  void Make(Engine::Options options = {}, absl::Duration fixed = {},
            absl::Duration per_row = {}) {
    options.threaded = false;
    options.clock = &clock_;
    auto model = std::make_unique<FakeDenoiser>(&clock_, fixed, per_row);
    model_ = model.get();
    std::vector<std::unique_ptr<Denoiser>> replicas;
    replicas.push_back(std::move(model));
    engine_ = *Engine::Create(options, std::move(replicas));
  }

  // With a background model (a FakeDenoiser of the given slope; 0.1 = the
  // same network as the model).
  void MakeWithBackground(Engine::Options options, double slope) {
    options.threaded = false;
    options.clock = &clock_;
    auto model = std::make_unique<FakeDenoiser>(&clock_);
    auto background = std::make_unique<FakeDenoiser>(&clock_);
    background->set_slope(slope);
    model_ = model.get();
    background_ = background.get();
    std::vector<std::unique_ptr<Denoiser>> replicas, backgrounds;
    replicas.push_back(std::move(model));
    backgrounds.push_back(std::move(background));
    auto engine = Engine::Create(options, std::move(replicas),
                                 std::move(backgrounds));
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = *std::move(engine);
  }

  // Labels of batch i.
  std::vector<int64_t> Labels(size_t i) const {
    return model_->batches().at(i).labels;
  }
  size_t Batches() const { return model_->batches().size(); }

  FakeClock clock_;
  FakeDenoiser* model_ = nullptr;
  FakeDenoiser* background_ = nullptr;
  std::unique_ptr<Engine> engine_;
};

TEST_F(EngineTest, RowsOfDifferentSamplersAndKindsShareABatch) {
  Make();
  Outcome<SampleResult> a, b;
  Outcome<ScoreResult> c;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(2, 3, 1), {}, a.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 3, 2, 1.0, SamplerType::kHeun),
                                    {}, b.Callback())
                  .ok());
  ASSERT_TRUE(SubmitScore(*engine_, Score(1, 4, 3), {}, c.Callback()).ok());
  ASSERT_TRUE(engine_->Step());
  // One forward pass: DDIM's 2 rows, Heun's 1, the score's 4 times.
  EXPECT_THAT(Labels(0), ElementsAre(1, 1, 2, 3, 3, 3, 3));
  // Each row is at its own request's time: DDIM and Heun start at
  // gamma(1) = 5; the score's rows are at four stratified times.
  const std::vector<float> g = model_->batches()[0].gammas;
  EXPECT_FLOAT_EQ(g[0], 5.0f);
  EXPECT_FLOAT_EQ(g[2], 5.0f);
  EXPECT_LT(g[3], 5.0f);
  EXPECT_EQ(c.calls, 1) << "the score needed one pass";
  ASSERT_TRUE(c.result.ok()) << c.result.status();
  EXPECT_EQ(c.result->network_evaluations, 4);
  while (engine_->Step()) {
  }
  // DDIM-3: 3 passes; Heun-3: 6 (2 per step).
  EXPECT_EQ(Batches(), 6u);
  ASSERT_TRUE(a.result.ok() && b.result.ok());
  EXPECT_EQ(a.result->network_evaluations, 2 * 3);
  EXPECT_EQ(b.result->network_evaluations, 6);
  EXPECT_THAT(Labels(3), ElementsAre(2)) << "only Heun is left";
}

TEST_F(EngineTest, EncodeRowsShareBatchesWithSamplingAndClimbInGamma) {
  Engine::Options options;
  options.max_batch = 4;
  Make(options);
  EncodeJob encode;
  encode.images = Score(3, 2, 0).images;  // 3 images of the fake's shape
  encode.sampler.steps = 4;
  encode.label = 5;
  Outcome<EncodeResult> e;
  Outcome<SampleResult> a;
  ASSERT_TRUE(SubmitEncode(*engine_, encode, {}, e.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*engine_, Sample(2, 3, 1), {}, a.Callback()).ok());
  ASSERT_TRUE(engine_->Step());
  // max_batch 4: the encode's 3 rows and one of the sample's 2.
  EXPECT_THAT(Labels(0), ElementsAre(5, 5, 5, 1));
  // Encoding starts at gamma(0) = -5; sampling at gamma(1) = 5.
  EXPECT_FLOAT_EQ(model_->batches()[0].gammas[0], -5.0f);
  EXPECT_FLOAT_EQ(model_->batches()[0].gammas[3], 5.0f);
  while (engine_->Step()) {
  }
  ASSERT_EQ(e.calls, 1);
  ASSERT_TRUE(e.result.ok()) << e.result.status();
  EXPECT_EQ(e.result->network_evaluations, 3 * 4);
  ASSERT_TRUE(a.result.ok());
  // The encode's gammas climb step by step to the last step's gamma.
  std::vector<float> encode_gammas;
  for (const Batch& b : model_->batches()) {
    for (size_t r = 0; r < b.labels.size(); ++r) {
      if (b.labels[r] == 5) encode_gammas.push_back(b.gammas[r]);
    }
  }
  ASSERT_EQ(encode_gammas.size(), 12u);
  for (size_t i = 3; i < encode_gammas.size(); i += 3) {
    EXPECT_GT(encode_gammas[i], encode_gammas[i - 3]);
  }
  // The result is the library's EncodeImages run alone.
  FakeDenoiser alone;
  std::vector<at::Tensor> x;
  for (const Image8& image : encode.images) {
    x.push_back(at::tensor(std::vector<int64_t>(image.pixels.begin(),
                                                image.pixels.end()))
                    .to(at::kByte)
                    .view({1, 1, 2, 2}));
  }
  const at::Tensor want = *EncodeImages(alone, at::cat(x), encode.sampler, 5);
  ASSERT_EQ(e.result->latents.size(), 3u);
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t p = 0; p < 4; ++p) {
      EXPECT_FLOAT_EQ(e.result->latents[i][p],
                      want[i].flatten()[p].item<float>());
    }
  }
}

TEST_F(EngineTest, NewRequestJoinsAtTheNextIterationAndLeavesWhenDone) {
  Make();
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 4, 1), {}, a.Callback()).ok());
  engine_->Step();
  EXPECT_THAT(Labels(0), ElementsAre(1));
  ASSERT_TRUE(SubmitSample(*engine_, Sample(2, 2, 2), {}, b.Callback()).ok());
  engine_->Step();
  engine_->Step();
  EXPECT_THAT(Labels(1), ElementsAre(2, 2, 1));
  EXPECT_THAT(Labels(2), ElementsAre(1, 2, 2)) << "the start rotates";
  EXPECT_EQ(b.calls, 1) << "B's 2 steps are done: it leaves at once";
  EXPECT_EQ(a.calls, 0);
  engine_->Step();
  EXPECT_THAT(Labels(3), ElementsAre(1));
  EXPECT_EQ(a.calls, 1);
  EXPECT_FALSE(engine_->Step()) << "idle";
  EXPECT_EQ(Batches(), 4u);
}

TEST_F(EngineTest, GuidedRequestsEvaluateBothHalvesInOnePass) {
  Make();
  Outcome<SampleResult> a;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(2, 1, 4, 3.0), {}, a.Callback()).ok());
  engine_->Step();
  EXPECT_THAT(Labels(0), ElementsAre(4, 4, kClasses, kClasses));
  ASSERT_TRUE(a.result.ok());
  EXPECT_EQ(a.result->network_evaluations, 4);
}

TEST_F(EngineTest, ResultsDoNotDependOnWhatSharesTheBatch) {
  // Two guided requests batched together, and max_batch splitting a pair
  // across passes, give the images SampleImages gives each one alone.
  Engine::Options options;
  options.max_batch = 3;
  Make(options);
  Outcome<SampleResult> a, b;
  const SampleJob ja = Sample(2, 5, 1, 2.0), jb = Sample(3, 4, 2);
  ASSERT_TRUE(SubmitSample(*engine_, ja, {}, a.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*engine_, jb, {}, b.Callback()).ok());
  while (engine_->Step()) {
  }
  ASSERT_TRUE(a.result.ok() && b.result.ok());
  for (const auto& [job, out] : {std::make_pair(ja, &a), std::make_pair(jb, &b)}) {
    FakeDenoiser alone;
    SampleOptions o;
    o.sampler = job.sampler;
    o.num_images = job.num_images;
    o.conditioning = job.conditioning;
    o.seed = job.seed;
    const std::vector<Image8> want = ToImages(*SampleImages(alone, o));
    ASSERT_EQ(out->result->images.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(out->result->images[i].pixels, want[i].pixels);
    }
  }
  for (size_t i = 0; i < Batches(); ++i) EXPECT_LE(Labels(i).size(), 3u);
}

TEST_F(EngineTest, OdeRowsRunInTheirOwnVjpPassesAlternatingWithPlainRows) {
  Engine::Options options;
  options.max_batch = 6;  // a VJP pass holds 6 / 3 = 2 rows
  Make(options);
  Outcome<SampleResult> a;
  Outcome<ScoreResult> c;
  ScoreJob ode = Score(2, 4, 3);
  ode.method = ScoreMethod::kOde;
  ode.ode.solver = OdeSolver::kRk4;
  ode.ode.steps = 1;  // 4 evaluations of 2 images x 2 probes = 4 rows each
  ode.ode.trace_samples = 2;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(2, 4, 1), {}, a.Callback()).ok());
  ASSERT_TRUE(SubmitScore(*engine_, ode, {}, c.Callback()).ok());
  while (engine_->Step()) {
  }
  const std::vector<Batch> batches = model_->batches();
  size_t vjp_batches = 0;
  for (size_t i = 0; i < batches.size(); ++i) {
    const Batch& b = batches[i];
    for (int64_t l : b.labels) {
      EXPECT_EQ(l == 3, b.vjp) << "batch " << i << " mixes the kinds";
    }
    if (b.vjp) {
      ++vjp_batches;
      EXPECT_LE(b.labels.size(), 2u);
    }
  }
  // 16 ODE rows in passes of 2; the sample's 4 steps alternate with the
  // first of them while both are live.
  EXPECT_EQ(vjp_batches, 8u);
  ASSERT_GE(batches.size(), 8u);
  for (size_t i = 0; i + 1 < 8; ++i) {
    EXPECT_NE(batches[i].vjp, batches[i + 1].vjp) << "iteration " << i;
  }
  ASSERT_TRUE(a.result.ok()) << a.result.status();
  ASSERT_TRUE(c.result.ok()) << c.result.status();
  EXPECT_EQ(c.result->network_evaluations, 16);
  ASSERT_EQ(c.result->scores.size(), 2u);
  // The same scores as the library alone gives (the plan owns its probes).
  FakeDenoiser alone;
  const OdeOptions& o = ode.ode;
  absl::StatusOr<at::Tensor> x = ToTensor(ode.images, alone.shape());
  ASSERT_TRUE(x.ok());
  absl::StatusOr<OdeScores> want = OdeLikelihood(
      alone, *x, at::full({2}, 3, at::kLong), o,
      at::make_generator<at::CPUGeneratorImpl>(ode.seed), 64);
  ASSERT_TRUE(want.ok()) << want.status();
  for (int i = 0; i < 2; ++i) {
    const ImageBpd& s = c.result->scores[i];
    EXPECT_DOUBLE_EQ(s.bpd, want->bpd[i].item<double>());
    EXPECT_EQ(s.ode_function_evaluations, 4);
    ASSERT_TRUE(s.ode_stderr_bpd.has_value());
    EXPECT_EQ(s.prior, 0);  // no ELBO parts
    EXPECT_TRUE(s.band.empty());
  }
}

TEST_F(EngineTest, CancelledRequestLeavesAtTheNextIteration) {
  Make();
  std::atomic<bool> cancelled{false};
  RequestControl control;
  control.is_cancelled = [&cancelled] { return cancelled.load(); };
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 100, 1), control, a.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 3, 2), {}, b.Callback()).ok());
  engine_->Step();
  cancelled = true;
  engine_->Step();
  EXPECT_THAT(Labels(0), ElementsAre(1, 2));
  EXPECT_THAT(Labels(1), ElementsAre(2)) << "A is gone before the next pass";
  EXPECT_EQ(a.calls, 1);
  EXPECT_EQ(a.result.status().code(), absl::StatusCode::kCancelled);
  while (engine_->Step()) {
  }
  EXPECT_EQ(engine_->network_evaluations(), 1 + 3);
  // A's admitted rows were released.
  EXPECT_TRUE(engine_->WaitIdle(absl::Now()));
}

TEST_F(EngineTest, DeadlineOnTheClockStopsTheRequest) {
  // Each pass costs 400 ms of fake time; a 1 s deadline allows three.
  Make({}, absl::Milliseconds(400));
  RequestControl control;
  control.deadline = clock_.Now() + absl::Seconds(1);
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 50, 1), control, a.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 5, 2), {}, b.Callback()).ok());
  while (engine_->Step()) {
  }
  EXPECT_EQ(a.result.status().code(), absl::StatusCode::kDeadlineExceeded);
  int a_rows = 0;
  for (size_t i = 0; i < Batches(); ++i) {
    for (int64_t l : Labels(i)) a_rows += l == 1;
  }
  EXPECT_EQ(a_rows, 3);
  // B ran from t = 0 to the end of its fifth pass: 5 x 400 ms.
  ASSERT_TRUE(b.result.ok());
  EXPECT_DOUBLE_EQ(b.result->queue_seconds, 0.0);
  EXPECT_DOUBLE_EQ(b.result->compute_seconds, 2.0);
}

TEST_F(EngineTest, QueueTimeIsMeasuredOnTheClock) {
  Make({}, absl::Milliseconds(100));
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 2, 1), {}, a.Callback()).ok());
  engine_->Step();  // t = 0.1 s
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 1, 2), {}, b.Callback()).ok());
  clock_.Advance(absl::Milliseconds(50));  // B waits 50 ms for the next pass
  engine_->Step();
  ASSERT_TRUE(b.result.ok());
  EXPECT_NEAR(b.result->queue_seconds, 0.05, 1e-9);
  EXPECT_NEAR(b.result->compute_seconds, 0.1, 1e-9);
}

TEST_F(EngineTest, ScorePriorityPutsScoreRowsFirst) {
  for (bool priority : {true, false}) {
    Engine::Options options;
    options.max_batch = 4;
    options.score_priority = priority;
    Make(options);
    Outcome<SampleResult> s;
    Outcome<ScoreResult> c;
    ASSERT_TRUE(SubmitSample(*engine_, Sample(4, 10, 1), {}, s.Callback()).ok());
    engine_->Step();  // the sample fills the batch
    ASSERT_TRUE(SubmitScore(*engine_, Score(1, 8, 3), {}, c.Callback()).ok());
    engine_->Step();
    engine_->Step();
    if (priority) {
      EXPECT_THAT(Labels(1), ElementsAre(3, 3, 3, 3));
      EXPECT_THAT(Labels(2), ElementsAre(3, 3, 3, 3));
      EXPECT_EQ(c.calls, 1) << "done after two passes";
    } else {
      // Rotation: the score leads every other pass.
      EXPECT_THAT(Labels(1), ElementsAre(3, 3, 3, 3));
      EXPECT_THAT(Labels(2), ElementsAre(1, 1, 1, 1));
      EXPECT_EQ(c.calls, 0);
    }
    engine_->Stop();
  }
}

TEST_F(EngineTest, FullQueueIsRefusedAtOnceAndFreedRowsAreReused) {
  Engine::Options options;
  options.max_queued_rows = 50;
  Make(options);
  Outcome<SampleResult> a, b, c;
  // 80 rows can never fit a 50-row queue: not retryable.
  absl::Status too_big = SubmitSample(*engine_, Sample(4, 20, 1), {}, a.Callback());
  EXPECT_EQ(too_big.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_big.message()), ::testing::HasSubstr("50"));
  ASSERT_TRUE(SubmitSample(*engine_, Sample(4, 10, 2), {}, b.Callback()).ok());
  // 20 more rows fit an empty queue but not this one: retry later.
  absl::Status full = SubmitSample(*engine_, Sample(1, 20, 3), {}, c.Callback());
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(full.message()), ::testing::HasSubstr("limit 50"));
  while (engine_->Step()) {
  }
  EXPECT_TRUE(SubmitSample(*engine_, Sample(1, 20, 3), {}, c.Callback()).ok());
  engine_->Stop();
  EXPECT_EQ(a.calls, 0) << "a refused job's callback never runs";
  EXPECT_EQ(c.result.status().code(), absl::StatusCode::kUnavailable);
}

TEST_F(EngineTest, MaxBatchIsRespectedAndLargeRequestsShareFairly) {
  Engine::Options options;
  options.max_batch = 8;
  Make(options);
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(8, 3, 1), {}, a.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*engine_, Sample(8, 3, 2), {}, b.Callback()).ok());
  while (engine_->Step()) {
  }
  ASSERT_EQ(Batches(), 6u);
  for (size_t i = 0; i < Batches(); ++i) {
    EXPECT_THAT(Labels(i), ElementsAreArray(std::vector<int64_t>(8, i % 2 + 1)));
  }
}

TEST_F(EngineTest, ProgressArrivesInOrderBeforeTheResult) {
  Make();
  std::vector<std::string> events;
  SampleJob job = Sample(2, 4, 1);
  job.preview_every = 2;
  job.progress = [&events](SampleProgress p) {
    events.push_back(absl::StrCat("step ", p.step, "/", p.total_steps,
                                  " previews ", p.previews.size()));
  };
  ASSERT_TRUE(SubmitSample(
                  *engine_, job, {},
                                 [&events](absl::StatusOr<SampleResult> r) {
                                   events.push_back(r.ok() ? "result" : "error");
                                 })
                  .ok());
  while (engine_->Step()) {
  }
  EXPECT_THAT(events, ElementsAre("step 1/4 previews 0", "step 2/4 previews 2",
                                  "step 3/4 previews 0", "step 4/4 previews 0",
                                  "result"));
}

TEST_F(EngineTest, StopFailsWhatIsLeftWithUnavailable) {
  Make();
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 10, 1), {}, a.Callback()).ok());
  engine_->Step();
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 10, 2), {}, b.Callback()).ok());
  engine_->Stop();
  EXPECT_EQ(a.result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(b.result.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(a.calls + b.calls, 2);
  EXPECT_EQ(SubmitSample(*engine_, Sample(1, 1, 3), {}, a.Callback()).code(),
            absl::StatusCode::kUnavailable);
}

TEST_F(EngineTest, BackgroundModelEvaluatesTheScoreRowsOfEachBatch) {
  Engine::Options options;
  options.max_batch = 4;
  MakeWithBackground(options, /*slope=*/0.3);
  Outcome<SampleResult> s;
  Outcome<ScoreResult> c;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(2, 10, 1), {}, s.Callback()).ok());
  ASSERT_TRUE(SubmitScore(*engine_, Score(1, 8, 3), {}, c.Callback()).ok());
  int iterations = 0;
  while (c.calls == 0 && engine_->Step()) ++iterations;
  const std::vector<Batch> main = model_->batches();
  const std::vector<Batch> background = background_->batches();
  ASSERT_EQ(main.size(), static_cast<size_t>(iterations));
  // Every main batch with score rows has one background batch of exactly
  // those rows (same gamma, same label, same order), and no sample rows go
  // to the background model.
  size_t b = 0;
  int64_t score_rows = 0;
  for (const Batch& batch : main) {
    std::vector<float> gammas;
    std::vector<int64_t> labels;
    for (size_t r = 0; r < batch.labels.size(); ++r) {
      if (batch.labels[r] != 3) continue;
      gammas.push_back(batch.gammas[r]);
      labels.push_back(batch.labels[r]);
    }
    if (gammas.empty()) continue;
    ASSERT_LT(b, background.size());
    EXPECT_THAT(background[b].gammas, ElementsAreArray(gammas));
    EXPECT_THAT(background[b].labels, ElementsAreArray(labels));
    score_rows += static_cast<int64_t>(gammas.size());
    ++b;
  }
  EXPECT_EQ(b, background.size());
  EXPECT_EQ(score_rows, 8);
  EXPECT_GT(iterations, 2) << "the score was split over several batches";
  ASSERT_TRUE(c.result.ok()) << c.result.status();
  ASSERT_EQ(c.result->scores.size(), 1u);
  const ImageBpd& score = c.result->scores[0];
  ASSERT_TRUE(score.background_bpd.has_value());
  EXPECT_NE(*score.background_bpd, score.bpd);  // another network
  EXPECT_TRUE(std::isfinite(*score.background_bpd));
  // K rows on each model.
  EXPECT_EQ(c.result->network_evaluations, 2 * 8);
  EXPECT_EQ(engine_->worker_stats()[0].background_rows, 8);
  while (engine_->Step()) {
  }
  ASSERT_TRUE(s.result.ok());
  EXPECT_EQ(s.result->network_evaluations, 2 * 10) << "no background rows";
}

TEST_F(EngineTest, BackgroundEqualToTheModelGivesALikelihoodRatioOfZero) {
  Engine::Options options;
  options.max_batch = 5;  // splits the rows unevenly over batches
  MakeWithBackground(options, /*slope=*/0.1);
  Outcome<ScoreResult> c;
  Outcome<SampleResult> s;
  ASSERT_TRUE(SubmitSample(*engine_, Sample(1, 6, 1), {}, s.Callback()).ok());
  ASSERT_TRUE(SubmitScore(*engine_, Score(3, 6, 3), {}, c.Callback()).ok());
  while (engine_->Step()) {
  }
  ASSERT_TRUE(c.result.ok()) << c.result.status();
  ASSERT_EQ(c.result->scores.size(), 3u);
  for (const ImageBpd& score : c.result->scores) {
    ASSERT_TRUE(score.background_bpd.has_value());
    EXPECT_EQ(*score.background_bpd, score.bpd);  // exactly: the same rows
  }
}

TEST_F(EngineTest, WithoutBackgroundModelThereIsNoBackgroundBpd) {
  Make();
  Outcome<ScoreResult> c;
  ASSERT_TRUE(SubmitScore(*engine_, Score(2, 4, 3), {}, c.Callback()).ok());
  while (engine_->Step()) {
  }
  ASSERT_TRUE(c.result.ok());
  for (const ImageBpd& score : c.result->scores) {
    EXPECT_FALSE(score.background_bpd.has_value());
  }
  EXPECT_EQ(c.result->network_evaluations, 2 * 4);
}

// A background model that does not fit the model.
class OtherShapeDenoiser : public FakeDenoiser {
 public:
  ImageShape shape() const override { return {1, 3, 3}; }
};
class OtherClassesDenoiser : public FakeDenoiser {
 public:
  int num_classes() const override { return 4; }
};

TEST(EngineCreateTest, RefusesABackgroundModelThatDoesNotFit) {
  auto make = [](std::unique_ptr<Denoiser> background) {
    std::vector<std::unique_ptr<Denoiser>> replicas, backgrounds;
    replicas.push_back(std::make_unique<FakeDenoiser>());
    backgrounds.push_back(std::move(background));
    Engine::Options options;
    options.threaded = false;
    return Engine::Create(options, std::move(replicas),
                          std::move(backgrounds))
        .status();
  };
  const absl::Status shape = make(std::make_unique<OtherShapeDenoiser>());
  EXPECT_EQ(shape.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(shape.message()),
              ::testing::HasSubstr("1x3x3, the model's 1x2x2"));
  const absl::Status classes = make(std::make_unique<OtherClassesDenoiser>());
  EXPECT_EQ(classes.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(classes.message()),
              ::testing::HasSubstr("num_classes"));
  EXPECT_TRUE(make(std::make_unique<FakeDenoiser>()).ok());
  // One background model per replica.
  std::vector<std::unique_ptr<Denoiser>> replicas, backgrounds;
  replicas.push_back(std::make_unique<FakeDenoiser>());
  replicas.push_back(std::make_unique<FakeDenoiser>());
  backgrounds.push_back(std::make_unique<FakeDenoiser>());
  Engine::Options options;
  options.threaded = false;
  EXPECT_FALSE(Engine::Create(options, std::move(replicas),
                              std::move(backgrounds))
                   .ok());
}

// A replica that samples in "bf16": Denoise is the fake's eps + 0.05, so
// the two paths give different numbers; DenoiseFp32 is the fake's own. Records
// which path each forward pass took.
class Bf16FakeDenoiser : public FakeDenoiser {
 public:
  Precision precision() const override { return Precision::kBf16; }
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override {
    paths.push_back("bf16");
    absl::StatusOr<at::Tensor> eps = FakeDenoiser::Denoise(z, gamma, label);
    return *eps + 0.05;
  }
  absl::StatusOr<at::Tensor> DenoiseFp32(const at::Tensor& z,
                                         const at::Tensor& gamma,
                                         const at::Tensor& label) override {
    paths.push_back("fp32");
    return FakeDenoiser::Denoise(z, gamma, label);
  }
  std::vector<std::string> paths;
};

// A sample (label 1) and a score (label 3) run together to the end on
// `model` in manual mode.
struct MixedRun {
  Outcome<SampleResult> sample;
  Outcome<ScoreResult> score;
  FakeClock clock;
  std::unique_ptr<Engine> engine;  // owns the model: the test reads it after
};
void RunMixed(std::unique_ptr<FakeDenoiser> model, bool score_fp32,
              bool with_sample, MixedRun* run) {
  Engine::Options options;
  options.threaded = false;
  options.clock = &run->clock;
  options.score_fp32 = score_fp32;
  std::vector<std::unique_ptr<Denoiser>> replicas;
  replicas.push_back(std::move(model));
  run->engine = *Engine::Create(options, std::move(replicas));
  Engine* engine = run->engine.get();
  if (with_sample) {
    ASSERT_TRUE(
        SubmitSample(*engine, Sample(2, 3, 1), {}, run->sample.Callback()).ok());
  }
  ASSERT_TRUE(SubmitScore(*engine, Score(2, 4, 3), {}, run->score.Callback()).ok());
  while (engine->Step()) {
  }
}

TEST(MixedPrecisionEngineTest, ScoreRowsRunInFp32WhenTheReplicaSamplesInBf16) {
  auto bf16 = std::make_unique<Bf16FakeDenoiser>();
  Bf16FakeDenoiser* fake = bf16.get();
  MixedRun mixed;
  RunMixed(std::move(bf16), /*score_fp32=*/true, true, &mixed);
  ASSERT_TRUE(mixed.sample.result.ok() && mixed.score.result.ok());
  // The first iteration is split: the score's 8 rows in an fp32 pass, the
  // sample's 2 rows in a bf16 pass; then only the sample is left.
  EXPECT_THAT(fake->paths, ElementsAre("fp32", "bf16", "bf16", "bf16"));
  EXPECT_THAT(fake->batches()[0].labels, ElementsAre(3, 3, 3, 3, 3, 3, 3, 3));
  EXPECT_THAT(fake->batches()[1].labels, ElementsAre(1, 1));
  // Each request got its own rows back: the score is what a pure fp32
  // replica gives, the sample what the bf16 path gives alone.
  MixedRun fp32_alone, bf16_alone;
  RunMixed(std::make_unique<FakeDenoiser>(), true, false, &fp32_alone);
  RunMixed(std::make_unique<Bf16FakeDenoiser>(), false, true, &bf16_alone);
  ASSERT_TRUE(fp32_alone.score.result.ok() && bf16_alone.sample.result.ok());
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(mixed.score.result->scores[i].bpd,
              fp32_alone.score.result->scores[i].bpd);
    EXPECT_EQ(mixed.sample.result->images[i].pixels,
              bf16_alone.sample.result->images[i].pixels);
  }
  // With --score_precision=same everything shares one bf16 pass, and the
  // score changes (so the comparison above can fail).
  auto same_model = std::make_unique<Bf16FakeDenoiser>();
  Bf16FakeDenoiser* same_fake = same_model.get();
  MixedRun same;
  RunMixed(std::move(same_model), /*score_fp32=*/false, true, &same);
  ASSERT_TRUE(same.score.result.ok());
  EXPECT_THAT(same_fake->paths, ElementsAre("bf16", "bf16", "bf16"));
  EXPECT_NE(same.score.result->scores[0].bpd,
            fp32_alone.score.result->scores[0].bpd);
}

TEST(ThreadedEngineTest, CallbacksRunOffTheWorkerThread) {
  auto model = std::make_unique<FakeDenoiser>();
  FakeDenoiser* fake = model.get();
  std::vector<std::unique_ptr<Denoiser>> replicas;
  replicas.push_back(std::move(model));
  auto engine = *Engine::Create({}, std::move(replicas));
  absl::Mutex mu;
  std::thread::id callback_thread;
  bool done = false;
  ASSERT_TRUE(SubmitSample(
                  *engine, Sample(2, 3, 1), {},
                                 [&](absl::StatusOr<SampleResult> r) {
                                   absl::MutexLock lock(&mu);
                                   EXPECT_TRUE(r.ok()) << r.status();
                                   callback_thread = std::this_thread::get_id();
                                   done = true;
                                 })
                  .ok());
  ASSERT_TRUE(engine->WaitIdle(absl::Now() + absl::Seconds(60)));
  absl::MutexLock lock(&mu);
  ASSERT_TRUE(done) << "WaitIdle waits for the callbacks too";
  EXPECT_NE(callback_thread, fake->forward_thread());
  EXPECT_NE(callback_thread, std::this_thread::get_id());
  const std::vector<WorkerStats> stats = engine->worker_stats();
  ASSERT_EQ(stats.size(), 1u);
  EXPECT_EQ(stats[0].batches, 3);
  EXPECT_EQ(stats[0].rows, 6);
}

// Two model versions on one worker (a model repository): each forward pass
// holds rows of one model only, the models take turns whatever their task
// counts, each request's rows all ran on its own model, and a model dropped
// by its owner stays alive until its last task leaves.
class MultiModelEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Engine::Options options;
    options.threaded = false;
    options.clock = &clock_;
    options.max_batch = 64;
    engine_ = *Engine::Create(options, /*workers=*/1);
    a_ = MakeModel(0.1, &fake_a_);
    b_ = MakeModel(0.3, &fake_b_);
  }
  std::shared_ptr<const EngineModel> MakeModel(double slope,
                                               FakeDenoiser** fake) {
    auto model = std::make_unique<FakeDenoiser>(&clock_);
    model->set_slope(slope);
    *fake = model.get();
    std::vector<std::unique_ptr<Denoiser>> replicas;
    replicas.push_back(std::move(model));
    return *EngineModel::Create(std::move(replicas));
  }
  absl::Status SubmitOn(std::shared_ptr<const EngineModel> model,
                        SampleJob job, Outcome<SampleResult>* out) {
    return engine_->Submit(
        MakeSampleTask(std::move(job), kClasses, out->Callback()), {},
        std::move(model));
  }
  void RunToEnd() {
    while (engine_->Step()) {
    }
  }

  FakeClock clock_;
  std::unique_ptr<Engine> engine_;
  FakeDenoiser* fake_a_ = nullptr;
  FakeDenoiser* fake_b_ = nullptr;
  std::shared_ptr<const EngineModel> a_, b_;
};

TEST_F(MultiModelEngineTest, ModelsNeverShareAPassAndTakeTurns) {
  // Model a: three requests (labels 1-3), 8 steps each; model b: one
  // (label 5), 8 steps. One model per pass, so 8 passes each, alternating:
  // b is not starved by a's three requests.
  Outcome<SampleResult> a1, a2, a3, b1;
  ASSERT_TRUE(SubmitOn(a_, Sample(2, 8, 1), &a1).ok());
  ASSERT_TRUE(SubmitOn(a_, Sample(2, 8, 2), &a2).ok());
  ASSERT_TRUE(SubmitOn(a_, Sample(2, 8, 3), &a3).ok());
  ASSERT_TRUE(SubmitOn(b_, Sample(2, 8, 5), &b1).ok());
  std::vector<char> turns;
  size_t seen_a = 0, seen_b = 0;
  while (engine_->Step()) {
    const size_t na = fake_a_->batches().size(), nb = fake_b_->batches().size();
    ASSERT_EQ(na + nb, seen_a + seen_b + 1) << "one pass per iteration";
    turns.push_back(na > seen_a ? 'a' : 'b');
    seen_a = na;
    seen_b = nb;
  }
  ASSERT_EQ(turns.size(), 16u);
  for (size_t i = 1; i < turns.size(); ++i) {
    EXPECT_NE(turns[i], turns[i - 1]) << "pass " << i << " of "
                                      << std::string(turns.begin(), turns.end())
                                      << ": each model gets every other pass";
  }
  for (const Batch& batch : fake_a_->batches()) {
    EXPECT_THAT(batch.labels, ::testing::Each(::testing::AnyOf(1, 2, 3)));
    EXPECT_EQ(batch.labels.size(), 6u) << "a's three requests share a's passes";
  }
  for (const Batch& batch : fake_b_->batches()) {
    EXPECT_THAT(batch.labels, ElementsAre(5, 5));
  }
  for (auto* out : {&a1, &a2, &a3, &b1}) {
    EXPECT_EQ(out->calls, 1);
    EXPECT_TRUE(out->result.ok()) << out->result.status();
  }
}

TEST_F(MultiModelEngineTest, ARequestRunsOnItsModelWhateverSharesTheWorker) {
  // The same job on model b alone and beside model a's traffic gives the
  // same images: nothing of a leaks into b's request.
  Outcome<SampleResult> alone;
  ASSERT_TRUE(SubmitOn(b_, Sample(2, 6, 4), &alone).ok());
  RunToEnd();
  ASSERT_TRUE(alone.result.ok());
  Outcome<SampleResult> beside, other;
  ASSERT_TRUE(SubmitOn(a_, Sample(3, 9, 4), &other).ok());
  ASSERT_TRUE(SubmitOn(b_, Sample(2, 6, 4), &beside).ok());
  RunToEnd();
  ASSERT_TRUE(beside.result.ok() && other.result.ok());
  const auto pixels = [](const SampleResult& r) {
    std::vector<std::vector<uint8_t>> all;
    for (const Image8& image : r.images) all.push_back(image.pixels);
    return all;
  };
  EXPECT_EQ(pixels(*beside.result), pixels(*alone.result));
  Outcome<SampleResult> same_job_on_a;
  ASSERT_TRUE(SubmitOn(a_, Sample(2, 6, 4), &same_job_on_a).ok());
  RunToEnd();
  ASSERT_TRUE(same_job_on_a.result.ok());
  EXPECT_NE(pixels(*same_job_on_a.result), pixels(*alone.result))
      << "model a (another slope) makes other images from the same job";
}

TEST_F(MultiModelEngineTest, ADroppedModelLivesUntilItsLastTaskLeaves) {
  Outcome<SampleResult> out;
  ASSERT_TRUE(SubmitOn(b_, Sample(1, 5, 2), &out).ok());
  std::weak_ptr<const EngineModel> weak = b_;
  b_.reset();  // the repository swapped it out
  ASSERT_TRUE(engine_->Step());
  EXPECT_FALSE(weak.expired()) << "its request still runs on it";
  RunToEnd();
  ASSERT_TRUE(out.result.ok()) << out.result.status();
  EXPECT_TRUE(weak.expired()) << "freed once its last task left";
}

TEST_F(MultiModelEngineTest, SubmitWithoutAModelOrWithTheWrongShapeIsRefused) {
  Outcome<SampleResult> out;
  EXPECT_EQ(engine_
                ->Submit(MakeSampleTask(Sample(1, 2, 1), kClasses,
                                        out.Callback()),
                         {})
                .code(),
            absl::StatusCode::kFailedPrecondition)
      << "this engine has no default model";
  std::vector<std::unique_ptr<Denoiser>> two;
  two.push_back(std::make_unique<FakeDenoiser>());
  two.push_back(std::make_unique<FakeDenoiser>());
  auto wide = *EngineModel::Create(std::move(two));
  EXPECT_EQ(SubmitOn(wide, Sample(1, 2, 1), &out).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(out.calls, 0);
}

// `n` replicas of type Fake, built from `args`, for Engine::Create; `fakes`
// gets a pointer to each (the engine owns them).
template <typename Fake, typename... Args>
std::vector<std::unique_ptr<Denoiser>> MakeReplicas(int n,
                                                    std::vector<Fake*>* fakes,
                                                    Args... args) {
  std::vector<std::unique_ptr<Denoiser>> replicas;
  for (int i = 0; i < n; ++i) {
    auto fake = std::make_unique<Fake>(args...);
    fakes->push_back(fake.get());
    replicas.push_back(std::move(fake));
  }
  return replicas;
}

TEST(LoneThreadsEngineTest, ALoneBusyWorkerUsesEveryCoreAndGivesThemBack) {
  // Two workers of 1 thread each, lone_threads 2: a request alone on the
  // engine runs its passes on 2 threads; once the other worker has work
  // too, both run on 1; alone again, 2.
  FakeClock clock;
  Engine::Options options;
  options.threaded = false;
  options.clock = &clock;
  options.threads = 1;
  options.lone_threads = 2;
  std::vector<FakeDenoiser*> fakes;
  std::vector<std::unique_ptr<Denoiser>> replicas =
      MakeReplicas(2, &fakes, &clock);
  auto engine = *Engine::Create(options, std::move(replicas));
  Outcome<SampleResult> long_one, short_one;
  ASSERT_TRUE(SubmitSample(*engine, Sample(1, 6, 1), {}, long_one.Callback()).ok());
  ASSERT_TRUE(engine->Step());
  ASSERT_TRUE(SubmitSample(*engine, Sample(1, 2, 2), {}, short_one.Callback()).ok());
  while (engine->Step()) {
  }
  ASSERT_TRUE(long_one.result.ok() && short_one.result.ok());
  std::vector<int> a, b;
  for (const Batch& batch : fakes[0]->batches()) a.push_back(batch.threads);
  for (const Batch& batch : fakes[1]->batches()) b.push_back(batch.threads);
  // Worker 0 (the long request): alone for two passes (in the second Step
  // it goes first, before worker 1 has taken its task), beside worker 1 for
  // one (worker 1 retires the short request in its second pass), then
  // alone again.
  EXPECT_THAT(a, ElementsAre(2, 2, 1, 2, 2, 2));
  EXPECT_THAT(b, ElementsAre(1, 1));
  at::set_num_threads(1);
}

TEST(LoneThreadsEngineTest, ACallerThatWaitsForEachResultIsAlwaysAlone) {
  // A client that sends its next request when it sees the last one's result
  // never overlaps itself, so every pass runs on the lone thread count: a
  // worker stops counting as busy before it hands a result over, not after
  // (a seed's result depends on the thread count, docs/reproducibility.md).
  // Threaded, as a server runs; the chain is long enough that the old order
  // (busy cleared after the result was posted) showed up as a 1-thread pass.
  Engine::Options options;
  options.threads = 1;
  options.lone_threads = 2;
  std::vector<FakeDenoiser*> fakes;
  std::vector<std::unique_ptr<Denoiser>> replicas =
      MakeReplicas(2, &fakes);
  auto engine = *Engine::Create(options, std::move(replicas));
  constexpr int kRequests = 30;
  absl::Mutex mu;
  int finished = 0;
  absl::Status failure;
  std::function<void()> next = [&]() {
    absl::Status submitted = SubmitSample(
        *engine, Sample(1, 2, 1), {},
        [&](absl::StatusOr<SampleResult> result) {
          bool more;
          {
            absl::MutexLock lock(&mu);
            if (!result.ok()) failure = result.status();
            more = ++finished < kRequests && failure.ok();
          }
          if (more) next();
        });
    if (!submitted.ok()) {
      absl::MutexLock lock(&mu);
      failure = submitted;
      finished = kRequests;
    }
  };
  next();
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(
        +[](int* n) { return *n >= kRequests; }, &finished));
  }
  ASSERT_TRUE(failure.ok()) << failure;
  int passes = 0;
  for (FakeDenoiser* fake : fakes) {
    for (const Batch& batch : fake->batches()) {
      EXPECT_EQ(batch.threads, 2) << "a pass of a lone request on 1 thread";
      ++passes;
    }
  }
  EXPECT_EQ(passes, 2 * kRequests);
  engine.reset();
  at::set_num_threads(1);
}

// Two workers, lone_split on, manual mode (their fake replicas record the
// rows each pass gave them).
struct SplitEngine {
  explicit SplitEngine(bool split) {
    Engine::Options options;
    options.threaded = false;
    options.threads = 1;
    options.lone_split = split;
    engine = *Engine::Create(options, MakeReplicas(2, &fakes));
  }
  std::vector<size_t> Rows(int replica) const {
    std::vector<size_t> rows;
    for (const Batch& b : fakes[replica]->batches()) {
      rows.push_back(b.labels.size());
    }
    return rows;
  }
  std::vector<FakeDenoiser*> fakes;
  std::unique_ptr<Engine> engine;
};

std::vector<std::vector<uint8_t>> Pixels(const SampleResult& r) {
  std::vector<std::vector<uint8_t>> all;
  for (const Image8& image : r.images) all.push_back(image.pixels);
  return all;
}

TEST(LoneSplitEngineTest, ALoneWorkerSharesEachPassWithTheIdleOne) {
  // A 5-image guided request (10 rows a pass) alone: each of its 3 passes
  // goes 5 rows to each replica; the images are those of the same request
  // on an engine that does not split (this fake is exact under any split).
  SplitEngine split(true), whole(false);
  Outcome<SampleResult> a, b;
  ASSERT_TRUE(SubmitSample(*split.engine, Sample(5, 3, 2, 3.0), {},
                           a.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*whole.engine, Sample(5, 3, 2, 3.0), {},
                           b.Callback()).ok());
  while (split.engine->Step()) {
  }
  while (whole.engine->Step()) {
  }
  ASSERT_TRUE(a.result.ok()) << a.result.status();
  ASSERT_TRUE(b.result.ok()) << b.result.status();
  EXPECT_THAT(split.Rows(0), ElementsAre(5, 5, 5));
  EXPECT_THAT(split.Rows(1), ElementsAre(5, 5, 5));
  EXPECT_THAT(whole.Rows(0), ElementsAre(10, 10, 10));
  EXPECT_TRUE(whole.Rows(1).empty());
  EXPECT_EQ(Pixels(*a.result), Pixels(*b.result));
  const std::vector<WorkerStats> stats = split.engine->worker_stats();
  EXPECT_EQ(stats[0].rows, 30) << "the pass is counted once, by its owner";
  EXPECT_EQ(stats[1].rows, 0);
  EXPECT_EQ(stats[1].lent_rows, 15);
  EXPECT_EQ(split.engine->network_evaluations(), 30);
}

TEST(LoneSplitEngineTest, NoSplitWhileTheOtherWorkerHasWorkOfItsOwn) {
  // Two requests, one per worker: neither is alone, so every pass is whole
  // on its own replica; once the short one leaves, the long one splits.
  SplitEngine split(true);
  Outcome<SampleResult> long_one, short_one;
  ASSERT_TRUE(SubmitSample(*split.engine, Sample(4, 4, 1), {},
                           long_one.Callback()).ok());
  ASSERT_TRUE(SubmitSample(*split.engine, Sample(2, 2, 2), {},
                           short_one.Callback()).ok());
  while (split.engine->Step()) {
  }
  ASSERT_TRUE(long_one.result.ok() && short_one.result.ok());
  // Worker 0's first pass: worker 1 has not taken its request yet (it
  // steps second), so worker 0 is alone and splits (2 rows each); its
  // second pass is whole (worker 1 runs its own first and second passes
  // beside it and retires the short request); its last two split again.
  EXPECT_THAT(split.Rows(0), ElementsAre(2, 4, 2, 2));
  // Lent, own, own, lent, lent.
  EXPECT_THAT(split.Rows(1), ElementsAre(2, 2, 2, 2, 2));
  EXPECT_EQ(split.engine->worker_stats()[1].lent_rows, 6);
}

TEST(LoneSplitEngineTest, ScoreRowsSplitToo) {
  SplitEngine split(true), whole(false);
  Outcome<ScoreResult> a, b;
  ASSERT_TRUE(SubmitScore(*split.engine, Score(3, 4, -1), {}, a.Callback()).ok());
  ASSERT_TRUE(SubmitScore(*whole.engine, Score(3, 4, -1), {}, b.Callback()).ok());
  while (split.engine->Step()) {
  }
  while (whole.engine->Step()) {
  }
  ASSERT_TRUE(a.result.ok() && b.result.ok());
  EXPECT_THAT(split.Rows(0), ElementsAre(6));  // 12 rows in one pass
  EXPECT_THAT(split.Rows(1), ElementsAre(6));
  ASSERT_EQ(a.result->scores.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(a.result->scores[i].bpd, b.result->scores[i].bpd);
  }
}

// Each replica's first forward pass waits (bounded) until the other's has
// begun: the two shares of a split pass meet only if they run at the same
// time on two threads.
class RendezvousDenoiser : public FakeDenoiser {
 public:
  struct Meeting {
    absl::Mutex mu;
    int arrived ABSL_GUARDED_BY(mu) = 0;
  };
  explicit RendezvousDenoiser(Meeting* meeting) : meeting_(meeting) {}
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z,
                                     const at::Tensor& gamma,
                                     const at::Tensor& label) override {
    if (!first_done_) {
      first_done_ = true;
      absl::MutexLock lock(&meeting_->mu);
      ++meeting_->arrived;
      auto both = [this]() ABSL_SHARED_LOCKS_REQUIRED(meeting_->mu) {
        return meeting_->arrived >= 2;
      };
      // A bound, not a sleep: returns as soon as the other share begins.
      met_ = meeting_->mu.AwaitWithTimeout(absl::Condition(&both),
                                           absl::Seconds(60));
    }
    return FakeDenoiser::Denoise(z, gamma, label);
  }
  bool met() const { return met_; }

 private:
  Meeting* const meeting_;
  bool first_done_ = false;  // one thread calls this replica at a time
  bool met_ = false;
};

TEST(LoneSplitEngineTest, TheSharesRunAtTheSameTimeOnTwoThreads) {
  Engine::Options options;
  options.threads = 1;
  options.lone_split = true;
  RendezvousDenoiser::Meeting meeting;
  std::vector<RendezvousDenoiser*> fakes;
  std::vector<std::unique_ptr<Denoiser>> replicas =
      MakeReplicas(2, &fakes, &meeting);
  auto engine = *Engine::Create(options, std::move(replicas));
  absl::Mutex mu;
  bool done = false;
  absl::StatusOr<SampleResult> result = absl::UnknownError("not called");
  ASSERT_TRUE(SubmitSample(*engine, Sample(4, 3, 1), {},
                           [&](absl::StatusOr<SampleResult> r) {
                             absl::MutexLock lock(&mu);
                             result = std::move(r);
                             done = true;
                           })
                  .ok());
  {
    absl::MutexLock lock(&mu);
    mu.Await(absl::Condition(&done));
  }
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(fakes[0]->met() && fakes[1]->met())
      << "the two shares of the first pass did not overlap";
  EXPECT_NE(fakes[0]->forward_thread(), fakes[1]->forward_thread());
  const std::vector<WorkerStats> stats = engine->worker_stats();
  EXPECT_EQ(stats[0].rows + stats[1].rows, 12);
  EXPECT_GE(stats[0].lent_rows + stats[1].lent_rows, 2)
      << "at least the first pass's share was lent";
  engine.reset();
  at::set_num_threads(1);
}

}  // namespace
}  // namespace vdm
