// Trains a TorchScript VDM (docs/design.md, "Model contract") in place on an image
// dataset (IDX files or a folder of PNGs) with the continuous-time VLB, or a
// VDM++ weighting of it: AdamW with linear warm-up, gradient-norm clipping
// and an EMA of the parameters; the EMA weights are evaluated (validation and
// test BPD, always the true VLB) and saved as the served TorchScript model
// with its provenance in the `metadata` attribute. Beside the model it keeps
// the training state (PATH.state: weights, EMA, AdamW moments, step, RNG and
// data order), so a run can be resumed exactly.
//
// Thread-compatible: one thread drives a Trainer; another thread (or a signal
// handler) may only set the atomic `Options::stop`.
#ifndef VDM_MODEL_TRAIN_TRAINER_H_
#define VDM_MODEL_TRAIN_TRAINER_H_

#include <ATen/core/Generator.h>
#include <torch/script.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "model/train/dataset.h"
#include "model/train/metrics.h"
#include "model/train/schedule.h"
#include "model/train/vlb.h"
#include "model/vdm/torchscript_model.h"

namespace torch::optim {
class AdamW;
}  // namespace torch::optim

namespace vdm {

class Trainer {
 public:
  struct Options {
    // Directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or a
    // folder of PNGs (see LoadDataset in dataset.h).
    std::string data_dir = "/usr/share/datasets/fashion-mnist";
    // Model to train (TorchScript .pt); required unless resuming, when it
    // defaults to out_path (only its architecture is used then).
    std::string init_path;
    std::string out_path;  // checkpoint to write (.pt); required
    // Training state beside the checkpoint; empty: out_path + ".state".
    std::string state_path;
    // Continue from the training state at state_path (it must exist).
    bool resume = false;
    std::string device = "cpu";
    int64_t steps = 1000;  // optimizer steps
    int64_t batch_size = 64;
    double lr = 1e-3;            // peak AdamW learning rate
    double weight_decay = 0.01;  // decoupled; only on tensors with >= 2 dims
    int64_t warmup_steps = 100;  // linear warm-up from lr / warmup_steps
    // Linear decay to lr / cooldown_steps over the last cooldown_steps of
    // `steps` (0: constant lr after the warm-up). A resumed run may change
    // steps and cooldown_steps: the schedule follows the current options.
    int64_t cooldown_steps = 0;
    double grad_clip = 1.0;      // max global gradient L2 norm; <= 0: no clip
    // EMA decay; the effective decay is min(ema_decay, (1+n)/(10+n)) at
    // step n so that short runs are not dominated by the initial weights.
    double ema_decay = 0.999;
    double label_dropout = 0.1;  // P(label -> "no label") in training
    // Background model training (Ren et al. 2019): each pixel of each
    // training batch is replaced with this probability by a uniform random
    // value (MutatePixels, from the trainer's generator: deterministic given
    // the seed). 0 = off; 0 <= rate < 1. Validation and test are unmutated.
    double mutation_rate = 0;
    // >= 0: leave out every training, validation and test image of this
    // class (a held-out class for near out-of-distribution tests); -1: none.
    int exclude_class = -1;
    Weighting weighting;         // training loss; evaluation is the VLB
    // The noise schedule (schedule.h): kFixed trains none of gamma's
    // parameters; kLearnedEndpoints the endpoints (gamma_min, gamma_max) by
    // the VLB; kLearned also the shape (gamma_net.*) by the gradient of the
    // squared per-example diffusion loss (variance minimisation), clipped
    // separately with grad_clip. The model must have those parameters.
    ScheduleKind schedule = ScheduleKind::kFixed;
    // The schedule's parameters learn at lr * schedule_lr_scale (their own
    // AdamW group, no weight decay, the same warm-up and cool-down).
    double schedule_lr_scale = 1.0;
    // The training forward pass's precision: "fp32", or "bf16" (autocast;
    // fp32 master weights, gradients and optimizer state; vlb.h ComputeVlb).
    // Evaluations (validation, test BPD, the sample grid) stay fp32.
    std::string precision = "fp32";
    uint64_t seed = 0;
    int64_t eval_every = 500;  // steps between validation runs; 0: never
    // Validation set: the last eval_images training images, held out from
    // training. 0: no validation.
    int64_t eval_images = 1000;
    int64_t test_images = 10000;  // final test BPD over the first N; 0: skip
    int eval_times = 1;           // K stratified times per image in evals
    int64_t eval_batch = 256;     // network rows per forward pass in evals
    // Also report the final test BPD given the true labels (doubles the
    // test time). The main test_bpd is unconditional ("no label"), as the
    // server scores unlabelled images. Only for class-conditional models.
    bool eval_conditional = false;
    int64_t checkpoint_every = 1000;  // steps; 0: only at the end
    int64_t log_every = 50;           // steps per progress line; 0: never
    // Metrics, one JSON object per line; empty: out_path + ".metrics.jsonl".
    std::string metrics_path;
    // At each validation, beside out_path: PATH.curve.png (training loss
    // and validation BPD against steps) and PATH.samples.png (guided DDIM
    // samples with a fixed seed, one row per class).
    bool pictures = true;
    int samples_per_class = 8;  // images per row; 0: no sample grid
    int sample_steps = 50;
    double sample_guidance = 3.0;
    FILE* log = stderr;               // progress output; nullptr: silent
    // Set (by a signal handler) => finish the current step, write the
    // checkpoint and return from Run().
    const std::atomic<bool>* stop = nullptr;
    std::function<absl::Time()> now = [] { return absl::Now(); };  // clock
  };

  // What Run() did.
  struct Summary {
    int64_t steps = 0;         // steps done by this trainer
    bool interrupted = false;  // stopped by Options::stop
    int64_t first_step = 0;    // the step this run started at (resume)
    double last_loss_bpd = 0;  // mean training loss of the last log window
    // Training steps per second of this run, not counting its first two
    // steps (TorchScript's profiling runs) nor evaluations and checkpoints.
    double steps_per_second = 0;
    std::optional<EvalResult> validation;
    std::optional<EvalResult> test;
    std::optional<EvalResult> test_conditional;
    double wall_seconds = 0;
  };

  // Loads the model (contract-checked) and the data, and checks that they
  // fit together and that the output directory exists. Errors name the
  // problem (missing file, shape mismatch, bad option).
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(
      const Options& options);
  ~Trainer();

  // Trains to options.steps, evaluates, writes the checkpoint(s).
  absl::StatusOr<Summary> Run();

  // One optimizer step on a batch (uint8 [B,C,H,W], labels [B] i64 before
  // label dropout); returns the batch's loss in bits per dimension.
  absl::StatusOr<double> TrainStep(const at::Tensor& images,
                                   const at::Tensor& labels);

  // BPD of `data` with the EMA weights (use_ema) or the current ones.
  absl::StatusOr<EvalResult> Evaluate(const Dataset& data, bool use_ema,
                                      const EvalOptions& options);

  // Writes the training state and then the EMA model with its metadata to
  // `path`, each atomically.
  absl::Status SaveCheckpoint(const std::string& path);

  // The training state file (out_path + ".state" unless set).
  const std::string& state_path() const { return state_path_; }

  int64_t step() const { return step_; }
  // The learning rate of the update at 0-based step `step`: the warm-up,
  // then options.lr, then the cool-down.
  double LearningRateAt(int64_t step) const;
  const Dataset& train_data() const { return train_; }
  const Dataset& validation_data() const { return validation_; }
  const Dataset& test_data() const { return test_; }
  const ModelInfo& model_info() const { return info_; }

 private:
  Trainer(const Options& options, std::unique_ptr<TorchScriptModel> model,
          Dataset train, Dataset validation, Dataset test);
  absl::Status Init();
  // Training state (trainer_state.cc).
  absl::Status SaveState(const std::string& path) const;
  absl::Status RestoreState(const std::string& path);
  std::string StateJson() const;
  absl::Status RestoreStateJson(const std::string& json);
  absl::Status TrainLoop(Summary& summary);
  absl::Status PeriodicWork();  // validation and checkpoint after a step
  absl::Status FinalEvaluation(Summary& summary);
  absl::StatusOr<EvalResult> Validate();
  absl::Status WritePictures();  // learning curve, schedule, sample grid
  absl::Status WriteEvalMetrics(const char* kind, const EvalResult& r);
  double CurrentLr() const;
  absl::Status LogProgress(double loss, double steps_per_second);
  void NextBatch(at::Tensor& images, at::Tensor& labels);
  // Labels with the "no label" entry at rate label_dropout.
  at::Tensor DropLabels(const at::Tensor& labels);
  void SetLearningRate();  // LearningRateAt(step_)
  void UpdateEma();
  std::string MetadataJson() const;
  void Log(const std::string& line) const;

  // Const after construction.
  const Options options_;
  const std::string state_path_;
  const std::unique_ptr<TorchScriptModel> model_;  // trained in place
  const Dataset train_;
  const Dataset validation_;
  const Dataset test_;
  ModelInfo info_;
  std::string init_path_;  // the model the run started from
  std::string init_metadata_;

  torch::jit::Module ema_module_;       // the served weights
  std::vector<at::Tensor> params_;      // trainable, in named order
  std::vector<at::Tensor> ema_params_;  // EMA copies of params_
  // params_ minus the schedule's shape: the VLB's gradient, clipped together
  // (all of params_ unless the schedule is kLearned).
  std::vector<at::Tensor> vlb_params_;
  std::vector<at::Tensor> endpoint_params_;  // trained gamma_min, gamma_max
  std::vector<at::Tensor> shape_params_;     // trained gamma_net.*
  bool has_schedule_group_ = false;  // the optimizer's last group: gamma's
  // gamma at 11 points of the initial model (plotted beside the current).
  std::vector<std::pair<double, double>> initial_schedule_;
  std::unique_ptr<torch::optim::AdamW> optimizer_;
  at::Generator gen_;
  int64_t step_ = 0;
  int bad_steps_ = 0;             // consecutive steps skipped as non-finite
  int64_t validation_step_ = -1;  // step of validation_result_
  int64_t init_steps_ = 0;  // steps recorded in the initial model's metadata
  at::Tensor order_;        // permutation of the training set, this epoch
  int64_t cursor_ = 0;      // next position in order_
  std::unique_ptr<MetricsLog> metrics_;  // opened by Run()
  absl::Time start_;
  double earlier_wall_seconds_ = 0;  // wall time of the runs before a resume
  std::optional<EvalResult> validation_result_;
  std::optional<EvalResult> test_result_;
  std::optional<EvalResult> test_conditional_result_;
  bool interrupted_ = false;
  int64_t resumed_from_ = -1;  // step restored by RestoreState; -1: none
};

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_TRAINER_H_
