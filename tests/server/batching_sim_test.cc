// The admission policies (bench/admission.h) on the batching
// simulation's fake clock: three requests and a score with known arrival
// times, and the batches and completion times worked out by hand for each
// policy. Costs: 10 ms per pass + 1 ms per row.
#include "bench/batching_sim.h"

#include <ATen/ATen.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <memory>
#include <vector>

#include "model/vdm/denoiser.h"
#include "server/tasks.h"

namespace vdm {
namespace {

using ::testing::ElementsAre;

SimRequest Sample(double arrival_ms, int images, int steps, bool guided) {
  SimRequest r;
  r.arrival = absl::Milliseconds(arrival_ms);
  r.sample.num_images = images;
  r.sample.sampler.type = SamplerType::kDdim;
  r.sample.sampler.steps = steps;
  r.sample.conditioning.label = guided ? 3 : -1;
  r.sample.conditioning.guidance_scale = guided ? 2.0 : 1.0;
  return r;
}

// R0: DDIM-3, 1 row a step, at 0; R1: DDIM-2, 2 images, at 2 ms; R2: DDIM-1,
// 1 guided image (2 rows), at 4 ms; R3: ScoreBPD K = 2 (2 rows), at 30 ms.
std::vector<SimRequest> Trace() {
  std::vector<SimRequest> t = {Sample(0, 1, 3, false), Sample(2, 2, 2, false),
                               Sample(4, 1, 1, true)};
  SimRequest score;
  score.arrival = absl::Milliseconds(30);
  score.is_score = true;
  score.score.images.push_back({1, 8, 8, std::vector<uint8_t>(64, 100)});
  score.score.timesteps = 2;
  t.push_back(score);
  return t;
}

struct Schedule {
  std::vector<int64_t> rows;       // per pass
  std::vector<double> starts_ms;   // per pass
  std::vector<double> done_ms;     // per request: arrival + latency
};

Schedule Simulated(Admission admission, int max_batch) {
  Engine::Options options;
  options.max_batch = max_batch;
  SimPolicy policy;
  policy.admission = admission;
  policy.batch_window = absl::Milliseconds(5);
  const std::vector<SimRequest> trace = Trace();
  absl::StatusOr<SimOutcome> out = Simulate(
      options, policy, {absl::Milliseconds(10), absl::Milliseconds(1)}, trace);
  EXPECT_TRUE(out.ok()) << out.status();
  Schedule s;
  if (!out.ok()) return s;
  for (const SimBatch& b : out->batches) {
    s.rows.push_back(b.rows);
    s.starts_ms.push_back(absl::ToDoubleMilliseconds(b.start));
  }
  for (size_t i = 0; i < trace.size(); ++i) {
    s.done_ms.push_back(
        absl::ToDoubleMilliseconds(trace[i].arrival + out->latency[i]));
  }
  return s;
}

TEST(AdmissionTest, ContinuousJoinsAtTheNextPass) {
  // R1 and R2 arrive during R0's first pass and join the second; R2 leaves
  // after it, R0 and R1 after the third; R3 arrives during the third.
  const Schedule s = Simulated(Admission::kContinuous, 8);
  EXPECT_THAT(s.rows, ElementsAre(1, 5, 3, 2));
  EXPECT_THAT(s.starts_ms, ElementsAre(0, 11, 26, 39));
  EXPECT_THAT(s.done_ms, ElementsAre(39, 39, 26, 51));
}

TEST(AdmissionTest, OneAtATimeRunsEachRequestAlone) {
  const Schedule s = Simulated(Admission::kOneAtATime, 8);
  EXPECT_THAT(s.rows, ElementsAre(1, 1, 1, 2, 2, 2, 2));
  EXPECT_THAT(s.starts_ms, ElementsAre(0, 11, 22, 33, 45, 57, 69));
  EXPECT_THAT(s.done_ms, ElementsAre(33, 57, 69, 81));
}

TEST(AdmissionTest, RequestLevelBatchClosesWhenTheWindowEnds) {
  // R0, R1 and R2 (5 rows < 8) arrive within R0's 5 ms window: one batch
  // at 5 ms that runs to completion; R3 waits for it although it arrived
  // (at 30 ms) while only R0 was left.
  const Schedule s = Simulated(Admission::kRequestLevel, 8);
  EXPECT_THAT(s.rows, ElementsAre(5, 3, 1, 2));
  EXPECT_THAT(s.starts_ms, ElementsAre(5, 20, 33, 44));
  EXPECT_THAT(s.done_ms, ElementsAre(44, 33, 20, 56));
}

TEST(AdmissionTest, RequestLevelBatchClosesWhenMaxBatchIsFull) {
  // With max_batch 4, R2's arrival at 4 ms fills the batch (1 + 2 + 2 rows)
  // before the window ends: R0 and R1 start at once; R2 does not fit and
  // waits, with R3, for the next batch.
  const Schedule s = Simulated(Admission::kRequestLevel, 4);
  EXPECT_THAT(s.rows, ElementsAre(3, 3, 1, 4));
  EXPECT_THAT(s.starts_ms, ElementsAre(4, 17, 30, 41));
  EXPECT_THAT(s.done_ms, ElementsAre(41, 30, 55, 55));
}

TEST(AdmissionTest, ContinuousBatchesRespectMaxBatch) {
  // The default policy with max_batch 2: R1's and R2's pairs cannot share
  // a pass; the rotation gives each request its turn.
  const Schedule s = Simulated(Admission::kContinuous, 2);
  for (int64_t rows : s.rows) EXPECT_LE(rows, 2);
  int64_t total = 0;
  for (int64_t rows : s.rows) total += rows;
  EXPECT_EQ(total, 3 + 4 + 2 + 2) << "every row evaluated once";
}

class ZeroDenoiser : public Denoiser {
 public:
  ImageShape shape() const override { return {1, 2, 2}; }
  int num_classes() const override { return 10; }
  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z, const at::Tensor&,
                                     const at::Tensor&) override {
    return at::zeros_like(z);
  }
  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override {
    return GammaValues{-5.0 + 10.0 * t, at::full_like(t, 10.0)};
  }
};

TEST(AdmissionTest, ThreadedRequestLevelFinishesAfterTheWindow) {
  for (Admission a : {Admission::kRequestLevel, Admission::kOneAtATime}) {
    auto policy = MakeAdmissionPolicy(a, 64, absl::Milliseconds(2));
    ASSERT_TRUE(policy.ok());
    Engine::Options options;
    options.admission = policy->get();
    std::vector<std::unique_ptr<Denoiser>> replicas;
    replicas.push_back(std::make_unique<ZeroDenoiser>());
    auto engine = *Engine::Create(options, std::move(replicas));
    int done = 0;  // callbacks run on the one completion thread
    for (int i = 0; i < 3; ++i) {
      SampleJob job;
      job.sampler.steps = 2;
      ASSERT_TRUE(engine
                      ->Submit(MakeSampleTask(
                                   job, 10,
                                   [&done](absl::StatusOr<SampleResult> r) {
                                     EXPECT_TRUE(r.ok()) << r.status();
                                     ++done;
                                   }),
                               {})
                      .ok());
    }
    ASSERT_TRUE(engine->WaitIdle(absl::Now() + absl::Seconds(60)));
    EXPECT_EQ(done, 3);
    EXPECT_EQ(engine->network_evaluations(), 3 * 2);
  }
}

TEST(AdmissionTest, NegativeBatchWindowIsRefused) {
  EXPECT_EQ(MakeAdmissionPolicy(Admission::kRequestLevel, 8,
                                absl::Milliseconds(-1))
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace vdm
