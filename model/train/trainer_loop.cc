// The training loop of Trainer (trainer.h): progress, periodic validation
// and checkpoints, final evaluation.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/train/trainer.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

std::string FormatEval(const EvalResult& r) {
  return absl::StrFormat(
      "%.4f +- %.4f bpd (prior %.4f, recon %.4f, diffusion %.4f; %d images, "
      "K=%d, %s)",
      r.bpd, r.stderr_bpd, r.prior, r.recon, r.diffusion, r.images, r.times,
      r.conditional ? "with labels" : "no label");
}

std::string FormatSeconds(double s) {
  return absl::FormatDuration(absl::Seconds(std::round(std::max(0.0, s))));
}

// Training loss and speed over the steps since the last progress line; the
// speed counts training time only (not evaluations or checkpoints).
struct ProgressWindow {
  double loss_sum = 0;
  double seconds = 0;
  int64_t steps = 0;
  void Add(double loss, double step_seconds) {
    loss_sum += loss;
    seconds += step_seconds;
    ++steps;
  }
  double MeanLoss() const { return steps > 0 ? loss_sum / steps : 0; }
  double StepsPerSecond() const { return seconds > 0 ? steps / seconds : 0; }
};

}  // namespace

absl::StatusOr<EvalResult> Trainer::Validate() {
  EvalOptions eval;
  eval.times = options_.eval_times;
  eval.batch_rows = options_.eval_batch;
  eval.seed = options_.seed + 1;  // the same noise at every validation
  eval.stop = options_.stop;
  const absl::Time start = options_.now();
  VDM_ASSIGN_OR_RETURN(EvalResult result,
                       Evaluate(validation_, /*use_ema=*/true, eval));
  validation_result_ = result;
  validation_step_ = step_;
  Log(absl::StrCat(
      "validation at step ", step_, ": ", FormatEval(result), " in ",
      FormatSeconds(absl::ToDoubleSeconds(options_.now() - start))));
  return result;
}

absl::StatusOr<Trainer::Summary> Trainer::Run() {
  start_ = options_.now();
  Log(absl::StrFormat(
      "training %s on %s: %d train, %d validation, %d test images; model "
      "%dx%dx%d, %d classes, predicts %s; %d trainable tensors",
      options_.init_path, options_.data_dir, train_.size(), validation_.size(),
      test_.size(), info_.shape.channels, info_.shape.height, info_.shape.width,
      info_.num_classes, info_.prediction, params_.size()));
  Summary summary;
  VDM_RETURN_IF_ERROR(TrainLoop(summary));
  if (!interrupted_) VDM_RETURN_IF_ERROR(FinalEvaluation(summary));
  VDM_RETURN_IF_ERROR(SaveCheckpoint(options_.out_path));
  summary.steps = step_;
  summary.interrupted = interrupted_;
  summary.validation = validation_result_;
  summary.test = test_result_;
  summary.test_conditional = test_conditional_result_;
  summary.wall_seconds = absl::ToDoubleSeconds(options_.now() - start_);
  return summary;
}

absl::Status Trainer::TrainLoop(Summary& summary) {
  const bool tty = options_.log != nullptr && isatty(fileno(options_.log));
  ProgressWindow window;
  while (step_ < options_.steps) {
    if (options_.stop != nullptr && options_.stop->load()) {
      interrupted_ = true;
      Log(absl::StrCat("stopping at step ", step_, " (signal)"));
      break;
    }
    const absl::Time begin = options_.now();
    at::Tensor images, labels;
    NextBatch(images, labels);
    VDM_ASSIGN_OR_RETURN(double loss, TrainStep(images, labels));
    if (!std::isfinite(loss)) continue;  // skipped update (logged)
    window.Add(loss, absl::ToDoubleSeconds(options_.now() - begin));
    summary.last_loss_bpd = window.MeanLoss();
    if (options_.log_every > 0 &&
        (step_ % options_.log_every == 0 || step_ == options_.steps)) {
      const double rate = window.StepsPerSecond();
      Log(absl::StrFormat(
          "step %d/%d  loss %.4f bpd  %.2f steps/s  ETA %s", step_,
          options_.steps, window.MeanLoss(), rate,
          rate > 0 ? FormatSeconds((options_.steps - step_) / rate) : "?"));
      window = ProgressWindow();
    } else if (tty) {
      std::fprintf(options_.log, "\rstep %ld/%ld  loss %.4f bpd\x1b[K",
                   static_cast<long>(step_), static_cast<long>(options_.steps),
                   loss);
      std::fflush(options_.log);
    }
    VDM_RETURN_IF_ERROR(PeriodicWork());
    if (interrupted_) break;
  }
  return absl::OkStatus();
}

absl::Status Trainer::PeriodicWork() {
  if (options_.eval_every > 0 && step_ % options_.eval_every == 0 &&
      validation_.size() > 0) {
    absl::StatusOr<EvalResult> result = Validate();
    if (absl::IsCancelled(result.status())) {
      interrupted_ = true;
      return absl::OkStatus();
    }
    VDM_RETURN_IF_ERROR(result.status());
  }
  if (options_.checkpoint_every > 0 && step_ % options_.checkpoint_every == 0 &&
      step_ < options_.steps) {
    VDM_RETURN_IF_ERROR(SaveCheckpoint(options_.out_path));
  }
  return absl::OkStatus();
}

absl::Status Trainer::FinalEvaluation(Summary& summary) {
  auto run = [&](const Dataset& data, bool conditional,
                 std::optional<EvalResult>& out) -> absl::Status {
    EvalOptions eval;
    eval.times = options_.eval_times;
    eval.batch_rows = options_.eval_batch;
    eval.conditional = conditional;
    eval.seed = options_.seed + 2;
    eval.stop = options_.stop;
    const absl::Time start = options_.now();
    absl::StatusOr<EvalResult> result = Evaluate(data, /*use_ema=*/true, eval);
    if (absl::IsCancelled(result.status())) {
      interrupted_ = true;
      return absl::OkStatus();
    }
    VDM_RETURN_IF_ERROR(result.status());
    out = *result;
    Log(absl::StrCat(
        "test: ", FormatEval(*result), " in ",
        FormatSeconds(absl::ToDoubleSeconds(options_.now() - start))));
    return absl::OkStatus();
  };
  if (validation_.size() > 0 && validation_step_ != step_) {
    absl::StatusOr<EvalResult> result = Validate();
    if (absl::IsCancelled(result.status())) {
      interrupted_ = true;
      return absl::OkStatus();
    }
    VDM_RETURN_IF_ERROR(result.status());
  }
  if (test_.size() == 0 || interrupted_) return absl::OkStatus();
  VDM_RETURN_IF_ERROR(run(test_, /*conditional=*/false, test_result_));
  if (info_.num_classes > 0 && options_.eval_conditional && !interrupted_) {
    VDM_RETURN_IF_ERROR(
        run(test_, /*conditional=*/true, test_conditional_result_));
  }
  return absl::OkStatus();
}

}  // namespace vdm
