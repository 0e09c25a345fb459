// vdm-train: trains a TorchScript VDM on Fashion-MNIST (or any IDX image
// dataset or folder of PNGs of the model's shape) and writes the EMA model as
// TorchScript, with the training state, metrics and pictures beside it.
//
//   vdm-train --init=untrained.pt --out=model.pt --steps=1000 --batch=64
//   vdm-train --out=model.pt --steps=2000 --resume   # continue the run
//
// SIGINT/SIGTERM finish the current step, write the checkpoint and state and
// exit 0 (a second signal kills the process).
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "model/train/trainer.h"
#include "model/vdm/omp_env.h"
#include "model/vdm/torchscript_model.h"

ABSL_FLAG(std::string, data, "/usr/share/datasets/fashion-mnist",
          "directory with {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], "
          "or a folder of PNGs: *.png (unlabeled) or class subfolders 0..9/ "
          "(optionally under train/ and test/)");
ABSL_FLAG(std::string, init, "",
          "model to train (TorchScript .pt); required unless --resume");
ABSL_FLAG(bool, resume, false,
          "continue from the training state (--state) of an earlier run");
ABSL_FLAG(std::string, state, "",
          "training state file; default: <out>.state");
ABSL_FLAG(std::string, out, "",
          "where to write the trained model (.pt); "
          "required");
ABSL_FLAG(std::string, device, "cpu", "torch device: cpu or cuda:N");
ABSL_FLAG(int64_t, steps, 1000, "optimizer steps");
ABSL_FLAG(int64_t, batch, 64, "training batch size");
ABSL_FLAG(int, threads, 0, "torch intra-op threads; 0 = all cores");
ABSL_FLAG(double, lr, 1e-3, "peak AdamW learning rate");
ABSL_FLAG(double, weight_decay, 0.01,
          "AdamW decoupled weight decay (weights with >= 2 dims only)");
ABSL_FLAG(int64_t, warmup_steps, 100, "linear learning-rate warm-up steps");
ABSL_FLAG(int64_t, cooldown_steps, 0,
          "linear learning-rate decay over the last N of --steps (0 = none)");
ABSL_FLAG(double, grad_clip, 1.0, "max gradient L2 norm; <= 0 disables");
ABSL_FLAG(double, ema_decay, 0.999, "EMA decay of the served weights");
ABSL_FLAG(double, label_dropout, 0.1,
          "probability of training a row with the 'no label' class");
ABSL_FLAG(double, mutation_rate, 0,
          "train a background model (likelihood ratio, Ren et al. 2019): "
          "replace each pixel of each training image with this probability "
          "by a uniform random value 0..255 (seeded by --seed); 0 = off, "
          "0 <= R < 1");
ABSL_FLAG(int, exclude_class, -1,
          "leave out every image of this class (training, validation, test): "
          "a held-out class for near out-of-distribution tests; -1 = none");
ABSL_FLAG(std::string, weighting, "elbo",
          "diffusion loss weighting: elbo (the VLB) or sigmoid "
          "(VDM++: w = sigmoid(-logSNR + weighting_bias)); evaluation always "
          "reports the VLB");
ABSL_FLAG(double, weighting_bias, 2.0, "bias b of the sigmoid weighting");
ABSL_FLAG(std::string, schedule, "fixed",
          "noise schedule: fixed (gamma not trained), learned_endpoints "
          "(gamma(0), gamma(1) by the VLB) or learned (also the shape of a "
          "model exported with --schedule=learned, by minimising the VLB "
          "estimator's variance; Kingma et al. 2021, section 5)");
ABSL_FLAG(double, schedule_lr_scale, 1.0,
          "learning rate of the schedule's parameters relative to --lr");
ABSL_FLAG(std::string, precision, "fp32",
          "training forward pass: fp32, or bf16 (CPU/CUDA autocast around the "
          "network; fp32 weights, gradients and optimizer; evaluations stay "
          "fp32). docs/training.md has the measured speed and BPD");
ABSL_FLAG(uint64_t, seed, 0, "random seed (data order, times, noise)");
ABSL_FLAG(int64_t, eval_every, 500, "steps between validation runs; 0 = never");
ABSL_FLAG(int64_t, eval_images, 1000,
          "validation images: the last N training images, held out");
ABSL_FLAG(int64_t, test_images, 10000,
          "test images for the final test BPD; 0 = skip");
ABSL_FLAG(int, eval_times, 1, "stratified times per image in evaluations");
ABSL_FLAG(int64_t, eval_batch, 256, "network rows per evaluation batch");
ABSL_FLAG(bool, eval_conditional, false,
          "also report the final test BPD given the true labels "
          "(class-conditional models; doubles the test time)");
ABSL_FLAG(int64_t, checkpoint_every, 1000,
          "steps between checkpoints; 0 = only at the end");
ABSL_FLAG(int64_t, log_every, 50, "steps per progress line");
ABSL_FLAG(std::string, metrics_out, "",
          "metrics file (JSON lines); default: <out>.metrics.jsonl");
ABSL_FLAG(bool, pictures, true,
          "at each validation write <out>.curve.png (learning curve) and "
          "<out>.samples.png (guided samples, one row per class)");
ABSL_FLAG(int, samples_per_class, 8, "sample grid columns; 0 = no grid");
ABSL_FLAG(int, sample_steps, 50, "DDIM steps of the sample grid");
ABSL_FLAG(double, sample_guidance, 3.0, "guidance scale of the sample grid");

namespace {

std::atomic<bool> g_stop{false};

extern "C" void HandleStopSignal(int /*sig*/) { g_stop.store(true); }

void InstallSignalHandlers() {
  struct sigaction action = {};
  action.sa_handler = HandleStopSignal;
  sigemptyset(&action.sa_mask);
  // A second signal gets the default action (terminates).
  action.sa_flags = SA_RESETHAND | SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

absl::StatusOr<vdm::Trainer::Options> OptionsFromFlags() {
  vdm::Trainer::Options o;
  absl::StatusOr<vdm::Weighting::Kind> weighting =
      vdm::ParseWeighting(absl::GetFlag(FLAGS_weighting));
  if (!weighting.ok()) return weighting.status();
  o.weighting.kind = *weighting;
  o.weighting.bias = absl::GetFlag(FLAGS_weighting_bias);
  absl::StatusOr<vdm::ScheduleKind> schedule =
      vdm::ParseSchedule(absl::GetFlag(FLAGS_schedule));
  if (!schedule.ok()) return schedule.status();
  o.schedule = *schedule;
  o.schedule_lr_scale = absl::GetFlag(FLAGS_schedule_lr_scale);
  o.precision = absl::GetFlag(FLAGS_precision);
  o.resume = absl::GetFlag(FLAGS_resume);
  o.state_path = absl::GetFlag(FLAGS_state);
  o.metrics_path = absl::GetFlag(FLAGS_metrics_out);
  o.pictures = absl::GetFlag(FLAGS_pictures);
  o.samples_per_class = absl::GetFlag(FLAGS_samples_per_class);
  o.sample_steps = absl::GetFlag(FLAGS_sample_steps);
  o.sample_guidance = absl::GetFlag(FLAGS_sample_guidance);
  o.data_dir = absl::GetFlag(FLAGS_data);
  o.init_path = absl::GetFlag(FLAGS_init);
  o.out_path = absl::GetFlag(FLAGS_out);
  o.device = absl::GetFlag(FLAGS_device);
  o.steps = absl::GetFlag(FLAGS_steps);
  o.batch_size = absl::GetFlag(FLAGS_batch);
  o.lr = absl::GetFlag(FLAGS_lr);
  o.weight_decay = absl::GetFlag(FLAGS_weight_decay);
  o.warmup_steps = absl::GetFlag(FLAGS_warmup_steps);
  o.cooldown_steps = absl::GetFlag(FLAGS_cooldown_steps);
  o.grad_clip = absl::GetFlag(FLAGS_grad_clip);
  o.ema_decay = absl::GetFlag(FLAGS_ema_decay);
  o.label_dropout = absl::GetFlag(FLAGS_label_dropout);
  o.mutation_rate = absl::GetFlag(FLAGS_mutation_rate);
  o.exclude_class = absl::GetFlag(FLAGS_exclude_class);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.eval_every = absl::GetFlag(FLAGS_eval_every);
  o.eval_images = absl::GetFlag(FLAGS_eval_images);
  o.test_images = absl::GetFlag(FLAGS_test_images);
  o.eval_times = absl::GetFlag(FLAGS_eval_times);
  o.eval_batch = absl::GetFlag(FLAGS_eval_batch);
  o.eval_conditional = absl::GetFlag(FLAGS_eval_conditional);
  o.checkpoint_every = absl::GetFlag(FLAGS_checkpoint_every);
  o.log_every = absl::GetFlag(FLAGS_log_every);
  o.stop = &g_stop;
  return o;
}

void PrintEval(const char* name, const vdm::EvalResult& r) {
  std::printf(
      "%-18s %.4f bpd +- %.4f (prior %.4f + recon %.4f + diffusion %.4f) "
      "over %ld images, K=%d\n",
      name, r.bpd, r.stderr_bpd, r.prior, r.recon, r.diffusion,
      static_cast<long>(r.images), r.times);
}

}  // namespace

int main(int argc, char** argv) {
  vdm::PrepareThreadPools(argv);  // before anything runs
  absl::SetProgramUsageMessage(
      "Trains a VDM (TorchScript) on IDX files or a folder of PNGs.\n"
      "  vdm-train --init=untrained.pt --out=model.pt [--steps=N --batch=B]");
  absl::ParseCommandLine(argc, argv);
  absl::StatusOr<vdm::Trainer::Options> parsed = OptionsFromFlags();
  if (!parsed.ok()) {
    std::fprintf(stderr, "vdm-train: %s\n",
                 std::string(parsed.status().message()).c_str());
    return 1;
  }
  vdm::Trainer::Options options = *parsed;
  if (options.out_path.empty() ||
      (options.init_path.empty() && !options.resume)) {
    std::fprintf(stderr, "vdm-train: --out and --init (or --resume) are "
                         "required\n");
    return 1;
  }
  if (!vdm::KeepLargeAllocationsInHeap()) {
    std::fprintf(stderr, "vdm-train: mallopt failed\n");
  }
  vdm::SetTorchThreads(absl::GetFlag(FLAGS_threads));
  InstallSignalHandlers();

  auto trainer = vdm::Trainer::Create(options);
  if (!trainer.ok()) {
    std::fprintf(stderr, "vdm-train: %s\n",
                 std::string(trainer.status().message()).c_str());
    return 1;
  }
  absl::StatusOr<vdm::Trainer::Summary> summary = (*trainer)->Run();
  if (!summary.ok()) {
    std::fprintf(stderr, "vdm-train: %s\n",
                 std::string(summary.status().message()).c_str());
    return 1;
  }
  std::printf("%s %ld steps (from step %ld) in %.0f s -> %s\n",
              summary->interrupted ? "interrupted after" : "trained",
              static_cast<long>(summary->steps),
              static_cast<long>(summary->first_step), summary->wall_seconds,
              options.out_path.c_str());
  std::printf("steps_per_second=%.4f\n", summary->steps_per_second);
  if (summary->validation) PrintEval("validation BPD", *summary->validation);
  if (summary->test) PrintEval("test BPD", *summary->test);
  if (summary->test_conditional) {
    PrintEval("test BPD | label", *summary->test_conditional);
  }
  return 0;
}
