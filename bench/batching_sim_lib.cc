#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "bench/batching_sim.h"
#include "model/vdm/denoiser.h"
#include "server/tasks.h"
#include "server/testing/fake_clock.h"

namespace vdm {
namespace {

constexpr int kSimClasses = 10;

// eps_hat = 0 on a linear schedule gamma(t) = -5 + 10 t; each pass hands
// its cost to `spend`, which moves the fake clock through it.
class SimDenoiser : public Denoiser {
 public:
  SimDenoiser(const CostModel& cost,
              std::function<void(absl::Duration, int64_t)> spend)
      : cost_(cost), spend_(std::move(spend)) {}

  ImageShape shape() const override { return {1, 8, 8}; }
  int num_classes() const override { return kSimClasses; }

  absl::StatusOr<at::Tensor> Denoise(const at::Tensor& z, const at::Tensor&,
                                     const at::Tensor&) override {
    const int64_t rows = z.size(0);
    spend_(cost_.fixed + cost_.per_row * rows, rows);
    return at::zeros_like(z);
  }

  absl::StatusOr<GammaValues> Gamma(const at::Tensor& t) override {
    return GammaValues{-5.0 + 10.0 * t, at::full_like(t, 10.0)};
  }

 private:
  const CostModel cost_;
  const std::function<void(absl::Duration, int64_t)> spend_;
};

}  // namespace

absl::StatusOr<SimOutcome> Simulate(Engine::Options options,
                                    const SimPolicy& policy,
                                    const CostModel& cost,
                                    const std::vector<SimRequest>& trace) {
  absl::StatusOr<std::unique_ptr<AdmissionPolicy>> admission =
      MakeAdmissionPolicy(policy.admission, options.max_batch,
                          policy.batch_window);
  if (!admission.ok()) return admission.status();
  options.admission = admission->get();
  FakeClock clock;
  const absl::Time origin = clock.Now();
  options.clock = &clock;
  options.threaded = false;
  options.max_queued_rows = std::numeric_limits<int64_t>::max() / 4;

  SimOutcome out;
  const size_t n = trace.size();
  out.latency.assign(n, absl::InfiniteDuration());
  std::vector<bool> done(n, false);
  size_t next = 0;     // the next request to submit
  size_t oldest = 0;   // the first one not done
  size_t finished = 0;
  absl::Status failure;
  Engine* engine = nullptr;

  auto finish = [&](size_t i, const absl::Status& status) {
    if (!status.ok() && failure.ok()) {
      failure = absl::InternalError(
          absl::StrCat("request ", i, " failed: ", status.ToString()));
    }
    out.latency[i] = clock.Now() - (origin + trace[i].arrival);
    done[i] = true;
    ++finished;
  };
  // Submits every request that has arrived by `t`, each at its own arrival
  // time; leaves the clock at the last of them.
  auto submit_until = [&](absl::Time t) {
    while (next < n && origin + trace[next].arrival <= t) {
      const absl::Time at = origin + trace[next].arrival;
      if (at > clock.Now()) clock.Advance(at - clock.Now());
      const size_t i = next++;
      absl::Status s;
      if (trace[i].is_score) {
        s = engine->Submit(
            MakeScoreTask(trace[i].score,
                          [&finish, i](absl::StatusOr<ScoreResult> r) {
                            finish(i, r.status());
                          }),
            {});
      } else {
        s = engine->Submit(
            MakeSampleTask(trace[i].sample, kSimClasses,
                           [&finish, i](absl::StatusOr<SampleResult> r) {
                             finish(i, r.status());
                           }),
            {});
      }
      if (!s.ok() && failure.ok()) {
        failure = absl::InternalError(
            absl::StrCat("request ", i, " refused: ", s.ToString()));
      }
    }
  };
  auto spend = [&](absl::Duration d, int64_t rows) {
    const absl::Time start = clock.Now();
    out.batches.push_back({start - origin, rows});
    out.busy += d;
    out.rows += rows;
    submit_until(start + d);  // arrivals during the pass
    clock.Advance(start + d - clock.Now());
  };

  std::vector<std::unique_ptr<Denoiser>> replicas;
  replicas.push_back(std::make_unique<SimDenoiser>(cost, spend));
  absl::StatusOr<std::unique_ptr<Engine>> made =
      Engine::Create(options, std::move(replicas));
  if (!made.ok()) return made.status();
  engine = made->get();

  while (failure.ok() && finished < n) {
    submit_until(clock.Now());
    if (engine->Step()) continue;
    // Idle, or a request-level batch window is open: wake at the next
    // arrival or when the window of the oldest queued request closes.
    while (oldest < n && done[oldest]) ++oldest;
    absl::Time wake = next < n ? origin + trace[next].arrival
                               : absl::InfiniteFuture();
    if (policy.admission == Admission::kRequestLevel && oldest < next) {
      wake = std::min(wake,
                      origin + trace[oldest].arrival + policy.batch_window);
    }
    if (wake <= clock.Now() || wake == absl::InfiniteFuture()) {
      failure = absl::InternalError(absl::StrCat(
          "engine stalled with ", n - finished, " requests unfinished"));
      break;
    }
    clock.Advance(wake - clock.Now());
  }
  engine->Stop();
  if (!failure.ok()) return failure;
  out.end = clock.Now() - origin;
  return out;
}

}  // namespace vdm
