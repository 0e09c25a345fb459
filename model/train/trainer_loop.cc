// The training loop of Trainer (trainer.h): progress, metrics, periodic
// validation with pictures, checkpoints, final evaluation.
#include <torch/optim/adamw.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "model/train/checkpoint.h"
#include "model/train/plot.h"
#include "model/train/preview.h"
#include "model/train/trainer.h"
#include "model/vdm/image_io.h"
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

// "[#########...........]  45%" for a terminal.
std::string Bar(int64_t done, int64_t total) {
  constexpr int kWidth = 24;
  const double f = total > 0 ? std::clamp(1.0 * done / total, 0.0, 1.0) : 1;
  const int fill = static_cast<int>(f * kWidth);
  return absl::StrFormat("[%s%s] %3d%%", std::string(fill, '#'),
                         std::string(kWidth - fill, '.'),
                         static_cast<int>(f * 100));
}

// The path beside a checkpoint: "model.pt" -> "model.pt.<suffix>".
std::string Beside(const std::string& path, const char* suffix) {
  return absl::StrCat(path, ".", suffix);
}

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
  VDM_RETURN_IF_ERROR(WriteEvalMetrics("validation", result));
  VDM_RETURN_IF_ERROR(WritePictures());
  return result;
}

absl::Status Trainer::WriteEvalMetrics(const char* kind,
                                       const EvalResult& r) {
  if (metrics_ == nullptr) return absl::OkStatus();
  nlohmann::json j = EvalToJson(r);
  j["kind"] = kind;
  j["step"] = step_;
  return metrics_->Write(j);
}

double Trainer::CurrentLr() const {
  const auto& groups = optimizer_->param_groups();
  if (groups.empty()) return 0;
  return static_cast<const torch::optim::AdamWOptions&>(groups[0].options())
      .lr();
}

absl::Status Trainer::WritePictures() {
  if (!options_.pictures || metrics_ == nullptr) return absl::OkStatus();
  absl::StatusOr<Image8> curve = PlotLearningCurve(
      metrics_->curve().loss, metrics_->curve().validation,
      WeightingName(options_.weighting.kind));
  if (curve.ok()) {
    VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(*curve));
    VDM_RETURN_IF_ERROR(
        WriteFileAtomic(Beside(options_.out_path, "curve.png"), png));
  }
  {
    // The schedule as log-SNR = -gamma against t: the served (EMA) one and
    // the initial model's.
    absl::StatusOr<std::vector<std::pair<double, double>>> now =
        ScheduleCurve(ema_module_, info_.device, 65);
    if (now.ok()) {
      PlotSeries initial{"INITIAL", {150, 150, 150}, {}, true};
      for (const auto& [t, g] : initial_schedule_) {
        initial.points.emplace_back(t, -g);
      }
      PlotSeries current{
          absl::StrCat("LOG-SNR AT STEP ", step_, " (",
                       absl::StrReplaceAll(
                           absl::AsciiStrToUpper(ScheduleName(options_.schedule)),
                           {{"_", " "}}),
                       ")"),
          {31, 119, 180},
          {},
          false};
      for (const auto& [t, g] : *now) current.points.emplace_back(t, -g);
      PlotOptions plot;
      plot.x_label = "T";
      plot.y_label = "LOG-SNR";
      plot.skip_fraction = 0;
      absl::StatusOr<Image8> picture = PlotCurves({initial, current}, plot);
      if (picture.ok()) {
        VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(*picture));
        VDM_RETURN_IF_ERROR(
            WriteFileAtomic(Beside(options_.out_path, "schedule.png"), png));
      }
    }
  }
  if (options_.samples_per_class <= 0) return absl::OkStatus();
  SampleGridOptions grid;
  grid.per_class = options_.samples_per_class;
  grid.steps = options_.sample_steps;
  grid.guidance = options_.sample_guidance;
  grid.seed = options_.seed + 3;
  grid.stop = options_.stop;
  const absl::Time start = options_.now();
  absl::StatusOr<Image8> samples = SampleGrid(ema_module_, info_, grid);
  if (absl::IsCancelled(samples.status())) return absl::OkStatus();
  VDM_RETURN_IF_ERROR(samples.status());
  VDM_ASSIGN_OR_RETURN(std::string png, EncodePng(*samples));
  const std::string path = Beside(options_.out_path, "samples.png");
  VDM_RETURN_IF_ERROR(WriteFileAtomic(path, png));
  Log(absl::StrFormat(
      "wrote %s (guided DDIM-%d, scale %g) in %s", path, grid.steps,
      grid.guidance,
      FormatSeconds(absl::ToDoubleSeconds(options_.now() - start))));
  return absl::OkStatus();
}

absl::StatusOr<Trainer::Summary> Trainer::Run() {
  start_ = options_.now();
  Log(absl::StrFormat(
      "training %s on %s: %d train, %d validation, %d test images; model "
      "%dx%dx%d, %d classes, predicts %s; %d trainable tensors; schedule %s",
      options_.init_path, options_.data_dir, train_.size(), validation_.size(),
      test_.size(), info_.shape.channels, info_.shape.height, info_.shape.width,
      info_.num_classes, info_.prediction, params_.size(),
      ScheduleName(options_.schedule)));
  const std::string metrics_path =
      options_.metrics_path.empty() ? Beside(options_.out_path, "metrics.jsonl")
                                    : options_.metrics_path;
  VDM_ASSIGN_OR_RETURN(metrics_, MetricsLog::Open(metrics_path, resumed_from_));
  Summary summary;
  summary.first_step = step_;
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
  ProgressWindow timed;  // this run's steps after its first two
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
    const double seconds = absl::ToDoubleSeconds(options_.now() - begin);
    window.Add(loss, seconds);
    if (step_ - summary.first_step > 2) timed.Add(loss, seconds);
    summary.last_loss_bpd = window.MeanLoss();
    summary.steps_per_second = timed.StepsPerSecond();
    if (options_.log_every > 0 &&
        (step_ % options_.log_every == 0 || step_ == options_.steps)) {
      VDM_RETURN_IF_ERROR(LogProgress(window.MeanLoss(),
                                      window.StepsPerSecond()));
      window = ProgressWindow();
    } else if (tty) {
      const double rate = window.StepsPerSecond();
      std::fprintf(options_.log, "\r%s step %ld/%ld  loss %.4f  ETA %s\x1b[K",
                   Bar(step_, options_.steps).c_str(),
                   static_cast<long>(step_), static_cast<long>(options_.steps),
                   loss, rate > 0 ? FormatSeconds((options_.steps - step_) /
                                                  rate).c_str()
                                  : "?");
      std::fflush(options_.log);
    }
    VDM_RETURN_IF_ERROR(PeriodicWork());
    if (interrupted_) break;
  }
  return absl::OkStatus();
}

absl::Status Trainer::LogProgress(double loss, double rate) {
  const bool elbo = options_.weighting.kind == Weighting::Kind::kElbo;
  Log(absl::StrFormat(
      "step %d/%d  loss %.4f%s  %.2f steps/s  lr %.2e  ETA %s", step_,
      options_.steps, loss, elbo ? " bpd" : " (sigmoid-weighted)", rate,
      CurrentLr(),
      rate > 0 ? FormatSeconds((options_.steps - step_) / rate) : "?"));
  if (metrics_ == nullptr) return absl::OkStatus();
  return metrics_->Write({{"kind", "train"},
                          {"step", step_},
                          {"loss", loss},
                          {"weighting", WeightingName(options_.weighting.kind)},
                          {"steps_per_s", rate},
                          {"lr", CurrentLr()}});
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
    VDM_RETURN_IF_ERROR(
        WriteEvalMetrics(conditional ? "test_conditional" : "test", *result));
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
