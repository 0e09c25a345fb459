#include "model/train/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "model/train/checkpoint.h"
#include "model/vdm/diffusion.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

// Consecutive steps with a non-finite loss or gradient before giving up.
constexpr int kMaxBadSteps = 10;

absl::Status CheckOptions(const Trainer::Options& o) {
  auto bad = [](const std::string& what) {
    return absl::InvalidArgumentError(what);
  };
  if (o.init_path.empty() && !o.resume) {
    return bad("no initial model (init_path) given");
  }
  if (o.out_path.empty()) return bad("no output path (out_path) given");
  if (o.steps < 0) return bad("steps must be >= 0");
  if (o.batch_size < 1) return bad("batch_size must be >= 1");
  if (!(o.lr > 0)) return bad("lr must be > 0");
  if (o.weight_decay < 0) return bad("weight_decay must be >= 0");
  if (o.warmup_steps < 0) return bad("warmup_steps must be >= 0");
  if (o.cooldown_steps < 0) return bad("cooldown_steps must be >= 0");
  if (!(o.ema_decay >= 0 && o.ema_decay < 1)) {
    return bad("ema_decay must be in [0, 1)");
  }
  if (!(o.label_dropout >= 0 && o.label_dropout <= 1)) {
    return bad("label_dropout must be in [0, 1]");
  }
  if (o.weighting.kind == Weighting::Kind::kSigmoid &&
      !std::isfinite(o.weighting.bias)) {
    return bad("the sigmoid weighting's bias must be finite");
  }
  if (!(o.mutation_rate >= 0 && o.mutation_rate < 1)) {
    return bad("mutation_rate must be in [0, 1)");
  }
  if (o.exclude_class < -1) return bad("exclude_class must be >= 0 (or -1: none)");
  if (!(o.schedule_lr_scale > 0) || !std::isfinite(o.schedule_lr_scale)) {
    return bad("schedule_lr_scale must be > 0");
  }
  if (o.precision != "fp32" && o.precision != "bf16") {
    return bad(absl::StrCat("precision must be fp32 or bf16, got '",
                            o.precision, "'"));
  }
  if (o.eval_times < 1) return bad("eval_times must be >= 1");
  if (o.eval_batch < 1) return bad("eval_batch must be >= 1");
  if (o.eval_images < 0 || o.test_images < 0) {
    return bad("eval_images and test_images must be >= 0");
  }
  const std::string state =
      o.state_path.empty() ? o.out_path + ".state" : o.state_path;
  std::error_code ec;
  if (o.resume && !std::filesystem::is_regular_file(state, ec)) {
    return absl::NotFoundError(absl::StrCat(
        "--resume: no training state ", state, " (run without --resume to ",
        "start from the initial model)"));
  }
  std::filesystem::path dir = std::filesystem::path(o.out_path).parent_path();
  if (dir.empty()) dir = ".";
  if (!std::filesystem::is_directory(dir, ec)) {
    return bad(absl::StrCat("output directory ", dir.string(), " (of out_path ",
                            o.out_path, ") does not exist"));
  }
  return absl::OkStatus();
}

absl::Status TorchError(const char* what, const c10::Error& e) {
  return absl::InternalError(
      absl::StrCat(what, ": ", e.what_without_backtrace()));
}

std::unique_ptr<torch::optim::AdamW> MakeOptimizer(
    const std::vector<at::Tensor>& decay,
    const std::vector<at::Tensor>& no_decay,
    const std::vector<at::Tensor>& schedule, const Trainer::Options& o) {
  using torch::optim::AdamWOptions;
  AdamWOptions defaults(o.lr);
  defaults.weight_decay(o.weight_decay);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decay.empty()) {
    groups.emplace_back(decay, std::make_unique<AdamWOptions>(defaults));
  }
  if (!no_decay.empty()) {
    auto no_decay_options = std::make_unique<AdamWOptions>(defaults);
    no_decay_options->weight_decay(0.0);
    groups.emplace_back(no_decay, std::move(no_decay_options));
  }
  if (!schedule.empty()) {  // last: SetLearningRate scales its lr
    auto schedule_options = std::make_unique<AdamWOptions>(defaults);
    schedule_options->weight_decay(0.0);
    schedule_options->lr(o.lr * o.schedule_lr_scale);
    groups.emplace_back(schedule, std::move(schedule_options));
  }
  return std::make_unique<torch::optim::AdamW>(std::move(groups), defaults);
}

// Whether the module's gamma has a learned shape (gamma_net parameters).
bool HasScheduleShape(const torch::jit::Module& module) {
  for (const auto& p : module.named_parameters()) {
    if (IsScheduleShape(p.name)) return true;
  }
  return false;
}

}  // namespace

Trainer::Trainer(const Options& options,
                 std::unique_ptr<TorchScriptModel> model, Dataset train,
                 Dataset validation, Dataset test)
    : options_(options),
      state_path_(options.state_path.empty() ? options.out_path + ".state"
                                             : options.state_path),
      model_(std::move(model)),
      train_(std::move(train)),
      validation_(std::move(validation)),
      test_(std::move(test)),
      gen_(at::detail::createCPUGenerator(options.seed)) {}

Trainer::~Trainer() = default;

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(
    const Options& given) {
  VDM_RETURN_IF_ERROR(CheckOptions(given));
  Options options = given;
  if (options.init_path.empty()) options.init_path = options.out_path;
  TorchScriptModel::Options model_options;
  model_options.path = options.init_path;
  model_options.device = options.device;
  VDM_ASSIGN_OR_RETURN(std::unique_ptr<TorchScriptModel> model,
                       TorchScriptModel::Load(model_options));
  const ImageShape shape = model->shape();
  const int classes = model->num_classes();
  VDM_ASSIGN_OR_RETURN(Dataset all,
                       LoadDataset(options.data_dir, "train", shape, classes));
  if (options.exclude_class >= 0) {
    if (options.exclude_class >= classes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "exclude_class ", options.exclude_class, " is not a class of the "
          "model (", classes, " classes)"));
    }
    all = WithoutClass(all, options.exclude_class);
  }
  const int64_t n_train = all.size() - options.eval_images;
  if (n_train < options.batch_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        options.data_dir, ": ", all.size(), " training images minus ",
        options.eval_images, " held out for validation leave fewer than a ",
        "batch of ", options.batch_size));
  }
  Dataset test;
  if (options.test_images > 0) {
    VDM_ASSIGN_OR_RETURN(test, LoadDataset(options.data_dir, "t10k", shape,
                                           classes));
    if (options.exclude_class >= 0) {
      test = WithoutClass(test, options.exclude_class);
    }
    test = test.Slice(0, std::min(test.size(), options.test_images));
  }
  std::unique_ptr<Trainer> trainer(
      new Trainer(options, std::move(model), all.Slice(0, n_train),
                  all.Slice(n_train, all.size()), std::move(test)));
  VDM_RETURN_IF_ERROR(trainer->Init());
  if (options.resume) {
    VDM_RETURN_IF_ERROR(trainer->RestoreState(trainer->state_path()));
  }
  return trainer;
}

absl::Status Trainer::Init() {
  info_.shape = model_->shape();
  info_.num_classes = model_->num_classes();
  info_.prediction = model_->prediction();
  info_.device = model_->device();
  start_ = options_.now();
  init_path_ = options_.init_path;
  init_metadata_ = model_->metadata();
  init_steps_ = StepsInMetadata(init_metadata_);
  try {
    torch::jit::Module& module = model_->module();
    module.train(true);
    {
      torch::NoGradGuard no_grad;  // plain leaf copies, no clone graph
      ema_module_ = module.deepcopy();
    }
    ema_module_.eval();
    std::vector<at::Tensor> decay, no_decay, schedule_group;
    auto ema_named = ema_module_.named_parameters();
    auto ema_it = ema_named.begin();
    const ScheduleKind schedule = options_.schedule;
    for (const auto& p : module.named_parameters()) {
      const auto ema = *ema_it;
      ++ema_it;
      if (ema.name != p.name) {
        return absl::InternalError("EMA copy has different parameters");
      }
      // The schedule's parameters train as --schedule says, whatever their
      // flag in the file (fixed: none; in the saved model the flag stays).
      const bool endpoint = IsScheduleEndpoint(p.name);
      const bool shape = IsScheduleShape(p.name);
      if (endpoint) {
        p.value.requires_grad_(schedule != ScheduleKind::kFixed);
      } else if (shape) {
        p.value.requires_grad_(schedule == ScheduleKind::kLearned);
      }
      if (!p.value.requires_grad()) continue;
      ema.value.requires_grad_(true);  // keep the flag in the saved model
      params_.push_back(p.value);
      ema_params_.push_back(ema.value);
      (shape ? shape_params_ : vlb_params_).push_back(p.value);
      if (endpoint) endpoint_params_.push_back(p.value);
      (endpoint || shape ? schedule_group
                         : p.value.dim() >= 2 ? decay : no_decay)
          .push_back(p.value);
    }
    if (params_.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(options_.init_path, " has no trainable parameters"));
    }
    if (schedule != ScheduleKind::kFixed && endpoint_params_.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--schedule=", ScheduleName(schedule), ": ", options_.init_path,
          " has no schedule endpoint parameters (gamma_min, gamma_max)"));
    }
    if (schedule == ScheduleKind::kLearned && shape_params_.empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--schedule=learned: ", options_.init_path,
          " has a fixed-shape gamma (no gamma_net.* parameters); export it "
          "with model/net/export.py --schedule=learned"));
    }
    VDM_ASSIGN_OR_RETURN(initial_schedule_,
                         ScheduleCurve(module, info_.device));
    optimizer_ = MakeOptimizer(decay, no_decay, schedule_group, options_);
    has_schedule_group_ = !schedule_group.empty();
  } catch (const c10::Error& e) {
    return TorchError("setting up training", e);
  }
  return absl::OkStatus();
}

absl::StatusOr<double> Trainer::TrainStep(const at::Tensor& images,
                                          const at::Tensor& labels) {
  const int64_t b = images.size(0);
  try {
    // Antithetic times t_i = (u + i / B) mod 1.
    at::Tensor u = at::rand({1}, gen_, at::TensorOptions(at::kFloat));
    at::Tensor t = at::fmod(at::arange(b, at::kFloat) / b + u, 1.0);
    const bool learn_shape = !shape_params_.empty();
    ScheduleGraph schedule;
    VDM_ASSIGN_OR_RETURN(
        VlbTerms terms, ComputeVlb(model_->module(), info_, images,
                                   DropLabels(labels), t, gen_,
                                   options_.weighting,
                                   learn_shape ? &schedule : nullptr,
                                   options_.precision == "bf16"));
    at::Tensor loss = NatsToBpd(terms.Loss(), info_.shape.dims()).mean();
    const double value = loss.item<double>();
    optimizer_->zero_grad();
    loss.backward();
    if (learn_shape) {
      // The backward stopped at gamma(t), gamma'(t): the endpoints take the
      // VLB's gradient from there (added to that of the prior and
      // reconstruction terms), the shape that of the squared per-example
      // diffusion loss (one time per image here), in the loss's units.
      std::vector<at::Tensor> ge = EndpointGradient(schedule, endpoint_params_);
      for (size_t i = 0; i < ge.size(); ++i) {
        at::Tensor& grad = endpoint_params_[i].mutable_grad();
        grad = grad.defined() ? grad + ge[i] : ge[i];
      }
      std::vector<at::Tensor> gs = VarianceGradient(
          schedule, NatsToBpd(schedule.rows, info_.shape.dims()),
          shape_params_);
      for (size_t i = 0; i < gs.size(); ++i) {
        shape_params_[i].mutable_grad() = gs[i];
      }
    }
    const double max_norm = options_.grad_clip > 0
                                ? options_.grad_clip
                                : std::numeric_limits<double>::infinity();
    const double norm =
        torch::nn::utils::clip_grad_norm_(vlb_params_, max_norm);
    const double shape_norm =
        learn_shape ? torch::nn::utils::clip_grad_norm_(shape_params_, max_norm)
                    : 0.0;
    if (!std::isfinite(value) || !std::isfinite(norm) ||
        !std::isfinite(shape_norm)) {
      optimizer_->zero_grad();
      if (++bad_steps_ >= kMaxBadSteps) {
        return absl::InternalError(absl::StrCat(
            "loss or gradient not finite for ", bad_steps_,
            " consecutive steps at step ", step_ + 1, "; try a lower lr"));
      }
      Log(absl::StrCat("step ", step_ + 1, ": non-finite loss or gradient, ",
                       "update skipped"));
      return value;
    }
    bad_steps_ = 0;
    SetLearningRate();
    optimizer_->step();
    ++step_;
    UpdateEma();
    return value;
  } catch (const c10::Error& e) {
    return TorchError("training step", e);
  }
}

at::Tensor Trainer::DropLabels(const at::Tensor& labels) {
  const int64_t b = labels.size(0);
  at::Tensor none = at::full({b}, info_.num_classes, at::kLong);
  if (info_.num_classes == 0) return none;  // unconditional: always "none"
  at::Tensor drop = at::rand({b}, gen_, at::TensorOptions(at::kFloat)) <
                    options_.label_dropout;
  return at::where(drop, none, labels.to(at::kLong));
}

double Trainer::LearningRateAt(int64_t step) const {
  const double warm = options_.warmup_steps > 0
                          ? std::min(1.0, (step + 1.0) / options_.warmup_steps)
                          : 1.0;
  const double cool =
      options_.cooldown_steps > 0
          ? std::clamp(static_cast<double>(options_.steps - step) /
                           static_cast<double>(options_.cooldown_steps),
                       1.0 / static_cast<double>(options_.cooldown_steps), 1.0)
          : 1.0;
  return options_.lr * std::min(warm, cool);
}

void Trainer::SetLearningRate() {
  const double lr = LearningRateAt(step_);
  auto& groups = optimizer_->param_groups();
  for (size_t i = 0; i < groups.size(); ++i) {
    const bool schedule = has_schedule_group_ && i + 1 == groups.size();
    static_cast<torch::optim::AdamWOptions&>(groups[i].options())
        .lr(schedule ? lr * options_.schedule_lr_scale : lr);
  }
}

void Trainer::UpdateEma() {
  torch::NoGradGuard no_grad;
  const double n = static_cast<double>(step_);
  const double decay = std::min(options_.ema_decay, (1.0 + n) / (10.0 + n));
  for (size_t i = 0; i < params_.size(); ++i) {
    ema_params_[i].mul_(decay).add_(params_[i].detach(), 1.0 - decay);
  }
  // Buffers (if any) follow the trained model.
  auto ema_buffers = ema_module_.named_buffers();
  auto it = ema_buffers.begin();
  for (const auto& buffer : model_->module().named_buffers()) {
    (*it).value.copy_(buffer.value);
    ++it;
  }
}

void Trainer::NextBatch(at::Tensor& images, at::Tensor& labels) {
  const int64_t b = options_.batch_size;
  if (!order_.defined() || cursor_ + b > order_.size(0)) {
    order_ = at::randperm(train_.size(), gen_, at::TensorOptions(at::kLong));
    cursor_ = 0;
  }
  at::Tensor index = order_.slice(0, cursor_, cursor_ + b);
  cursor_ += b;
  images = train_.images.index_select(0, index);
  labels = train_.labels.index_select(0, index);
  if (options_.mutation_rate > 0) {
    images = MutatePixels(images, options_.mutation_rate, gen_);
  }
}

absl::StatusOr<EvalResult> Trainer::Evaluate(const Dataset& data, bool use_ema,
                                             const EvalOptions& options) {
  torch::jit::Module& module = use_ema ? ema_module_ : model_->module();
  try {
    if (!use_ema) module.eval();
    absl::StatusOr<EvalResult> result =
        EvaluateBpd(module, info_, data, options);
    if (!use_ema) module.train(true);
    return result;
  } catch (const c10::Error& e) {
    if (!use_ema) module.train(true);
    return TorchError("evaluation", e);
  }
}

std::string Trainer::MetadataJson() const {
  nlohmann::json meta = BaseMetadata(init_metadata_);
  const double wall = earlier_wall_seconds_ +
                      absl::ToDoubleSeconds(options_.now() - start_);
  meta["steps"] = init_steps_ + step_;
  // The training blocks of the runs the initial model came from, oldest
  // first, so that a continued run (or a steps=0 evaluation) keeps them.
  // A model whose metadata holds something else under the name starts a
  // new history (value() would hand back a non-array, and push_back throw).
  nlohmann::json history = nlohmann::json::array();
  if (meta.contains("training_history") && meta["training_history"].is_array()) {
    history = meta["training_history"];
  }
  if (meta.contains("training")) history.push_back(meta["training"]);
  if (!history.empty()) meta["training_history"] = std::move(history);
  meta["dataset"] = {
      {"name", std::filesystem::path(options_.data_dir).filename().string()},
      {"dir", options_.data_dir},
      {"train_images", train_.size()},
      {"validation_images", validation_.size()},
      {"test_images", test_.size()}};
  meta["training"] = {
      {"trainer", "vdm-train"},
      {"objective", "continuous-time VLB (bits/dim), antithetic times"},
      {"weighting", WeightingName(options_.weighting.kind)},
      {"schedule", ScheduleName(options_.schedule)},
      {"schedule_lr_scale", options_.schedule_lr_scale},
      {"precision", options_.precision},
      {"init", init_path_},
      {"init_steps", init_steps_},
      {"steps", step_},
      {"planned_steps", options_.steps},
      {"interrupted", interrupted_},
      {"batch", options_.batch_size},
      {"optimizer", "AdamW"},
      {"lr", options_.lr},
      {"weight_decay", options_.weight_decay},
      {"warmup_steps", options_.warmup_steps},
      {"cooldown_steps", options_.cooldown_steps},
      {"grad_clip", options_.grad_clip},
      {"ema_decay", options_.ema_decay},
      {"label_dropout", options_.label_dropout},
      {"mutation_rate", options_.mutation_rate},
      {"exclude_class", options_.exclude_class},
      {"seed", options_.seed},
      {"resumed", resumed_from_ >= 0},
      {"weights", "ema"},
      {"wall_time_s", wall},
      {"finished", absl::FormatTime(absl::RFC3339_sec, options_.now(),
                                    absl::UTCTimeZone())}};
  meta["wall_time_s"] = wall;
  {
    // The served schedule (the EMA weights') at 11 points; the kind is how
    // this run trained it.
    torch::jit::Module ema = ema_module_;
    absl::StatusOr<std::vector<std::pair<double, double>>> curve =
        ScheduleCurve(ema, info_.device);
    nlohmann::json t = nlohmann::json::array(), g = nlohmann::json::array();
    if (curve.ok()) {
      for (const auto& [ti, gi] : *curve) {
        t.push_back(ti);
        g.push_back(gi);
      }
    }
    meta["schedule"] = {{"kind", ScheduleName(options_.schedule)},
                        {"shape", HasScheduleShape(ema_module_)
                                      ? "monotone network"
                                      : "linear"},
                        {"t", t},
                        {"gamma", g}};
  }
  if (validation_result_) {
    meta["validation"] = EvalToJson(*validation_result_);
    meta["validation"]["step"] = init_steps_ + validation_step_;
  }
  if (test_result_) {
    meta["test"] = EvalToJson(*test_result_);
    meta["test_bpd"] = test_result_->bpd;
  }
  if (test_conditional_result_) {
    meta["test_conditional"] = EvalToJson(*test_conditional_result_);
    meta["test_bpd_conditional"] = test_conditional_result_->bpd;
  }
  return meta.dump();
}

absl::Status Trainer::SaveCheckpoint(const std::string& path) {
  // The state first: it alone is enough to resume, and a model file newer
  // than its state would be harder to explain.
  VDM_RETURN_IF_ERROR(SaveState(state_path_));
  VDM_RETURN_IF_ERROR(SaveModuleAtomic(ema_module_, MetadataJson(), path));
  Log(absl::StrCat("wrote ", path, " (EMA weights, step ", step_, ")"));
  return absl::OkStatus();
}

void Trainer::Log(const std::string& line) const {
  if (options_.log == nullptr) return;
  const bool tty = isatty(fileno(options_.log));
  std::fprintf(options_.log, "%s%s\n", tty ? "\r\x1b[K" : "", line.c_str());
  std::fflush(options_.log);
}

}  // namespace vdm
