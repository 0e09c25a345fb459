// The training state of Trainer (trainer.h): everything that a resumed run
// needs to continue exactly where a run stopped. One file written with
// torch::serialize::OutputArchive:
//   params/<i>, ema/<i>, buffers/<i>  the trained weights, their EMA, buffers
//   optimizer                         AdamW's state (moments, step counts)
//   rng                               the CPU generator of times, noise,
//                                     label dropout and data order
//   order                             this epoch's permutation (if any)
//   json                              step, cursor, provenance, evaluations
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/train/checkpoint.h"
#include "model/train/trainer.h"
#include "model/vdm/status_macros.h"

namespace vdm {
namespace {

constexpr int kStateVersion = 1;

std::optional<EvalResult> EvalFromJson(const nlohmann::json& j) {
  if (!j.is_object()) return std::nullopt;
  EvalResult r;
  r.bpd = j.value("bpd", 0.0);
  r.prior = j.value("prior_bpd", 0.0);
  r.recon = j.value("recon_bpd", 0.0);
  r.diffusion = j.value("diffusion_bpd", 0.0);
  r.stderr_bpd = j.value("stderr_bpd", 0.0);
  r.images = j.value("images", int64_t{0});
  r.times = j.value("times_per_image", 1);
  r.conditional = j.value("conditioning", "none") == "label";
  return r;
}

// Copies saved tensors `prefix/<i>` into `dst` (same count and shapes).
void ReadTensors(torch::serialize::InputArchive& archive,
                 const std::string& prefix, std::vector<at::Tensor>& dst) {
  at::Tensor count;
  archive.read(prefix + "/size", count);
  TORCH_CHECK(count.item<int64_t>() == static_cast<int64_t>(dst.size()),
              "the state has ", count.item<int64_t>(), " ", prefix,
              " tensors, the model ", dst.size());
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < dst.size(); ++i) {
    at::Tensor saved;
    archive.read(absl::StrCat(prefix, "/", i), saved);
    TORCH_CHECK(saved.sizes() == dst[i].sizes(), prefix, " tensor ", i,
                " has shape ", saved.sizes(), " in the state but ",
                dst[i].sizes(), " in the model");
    dst[i].copy_(saved);
  }
}

void WriteTensors(torch::serialize::OutputArchive& archive,
                  const std::string& prefix,
                  const std::vector<at::Tensor>& tensors) {
  archive.write(prefix + "/size",
                at::tensor(static_cast<int64_t>(tensors.size())));
  for (size_t i = 0; i < tensors.size(); ++i) {
    archive.write(absl::StrCat(prefix, "/", i), tensors[i].detach());
  }
}

std::vector<at::Tensor> Buffers(const torch::jit::Module& module) {
  std::vector<at::Tensor> out;
  for (const auto& b : module.named_buffers()) out.push_back(b.value);
  return out;
}

}  // namespace

std::string Trainer::StateJson() const {
  nlohmann::json j = {
      {"version", kStateVersion},
      {"step", step_},
      {"cursor", cursor_},
      {"bad_steps", bad_steps_},
      {"train_images", train_.size()},
      {"init_path", init_path_},
      {"init_metadata", init_metadata_},
      {"init_steps", init_steps_},
      {"seed", options_.seed},
      {"batch", options_.batch_size},
      {"weighting", WeightingName(options_.weighting.kind)},
      {"schedule", ScheduleName(options_.schedule)},
      {"wall_time_s", earlier_wall_seconds_ +
                          absl::ToDoubleSeconds(options_.now() - start_)},
      {"validation_step", validation_step_}};
  if (validation_result_) j["validation"] = EvalToJson(*validation_result_);
  return j.dump();
}

absl::Status Trainer::SaveState(const std::string& path) const {
  return WriteAtomically(path, "training state", [&](const std::string& tmp) {
    torch::serialize::OutputArchive archive;
    WriteTensors(archive, "params", params_);
    WriteTensors(archive, "ema", ema_params_);
    WriteTensors(archive, "buffers", Buffers(model_->module()));
    torch::serialize::OutputArchive optimizer;
    optimizer_->save(optimizer);
    archive.write("optimizer", optimizer);
    archive.write("rng", gen_.get_state());
    if (order_.defined()) archive.write("order", order_);
    archive.write("json", c10::IValue(StateJson()));
    archive.save_to(tmp);
  });
}

absl::Status Trainer::RestoreStateJson(const std::string& text) {
  const nlohmann::json j =
      nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || j.value("version", 0) != kStateVersion) {
    return absl::InvalidArgumentError("not a vdm-train state (version 1)");
  }
  if (j.value("train_images", int64_t{-1}) != train_.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the state was trained on ", j.value("train_images", int64_t{-1}),
        " training images, this run has ", train_.size(),
        " (resume with the same data and eval_images)"));
  }
  // The trained tensors (and AdamW's state) depend on which of gamma's
  // parameters train; a state written before --schedule existed is fixed.
  const std::string schedule = j.value("schedule", std::string("fixed"));
  if (schedule != ScheduleName(options_.schedule)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the state was trained with --schedule=", schedule,
        ", this run has --schedule=", ScheduleName(options_.schedule),
        " (resume with the same schedule)"));
  }
  step_ = j.value("step", int64_t{0});
  cursor_ = j.value("cursor", int64_t{0});
  bad_steps_ = j.value("bad_steps", 0);
  init_path_ = j.value("init_path", init_path_);
  init_metadata_ = j.value("init_metadata", init_metadata_);
  init_steps_ = j.value("init_steps", int64_t{0});
  earlier_wall_seconds_ = j.value("wall_time_s", 0.0);
  validation_step_ = j.value("validation_step", int64_t{-1});
  if (j.contains("validation")) {
    validation_result_ = EvalFromJson(j["validation"]);
  }
  resumed_from_ = step_;
  if (j.value("seed", options_.seed) != options_.seed ||
      j.value("batch", options_.batch_size) != options_.batch_size) {
    Log("note: resuming with a different seed or batch size than the state's;"
        " the run will not match an uninterrupted one");
  }
  return absl::OkStatus();
}

absl::Status Trainer::RestoreState(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) {
    return absl::NotFoundError(absl::StrCat(
        "--resume: no training state ", path, " (run without --resume to ",
        "start from the initial model)"));
  }
  try {
    torch::serialize::InputArchive archive;
    archive.load_from(path);
    c10::IValue json;
    archive.read("json", json);
    VDM_RETURN_IF_ERROR(RestoreStateJson(json.toStringRef()));
    ReadTensors(archive, "params", params_);
    ReadTensors(archive, "ema", ema_params_);
    std::vector<at::Tensor> buffers = Buffers(model_->module());
    ReadTensors(archive, "buffers", buffers);
    std::vector<at::Tensor> ema_buffers = Buffers(ema_module_);
    ReadTensors(archive, "buffers", ema_buffers);
    torch::serialize::InputArchive optimizer;
    archive.read("optimizer", optimizer);
    optimizer_->load(optimizer);
    at::Tensor rng;
    archive.read("rng", rng);
    gen_.set_state(rng);
    at::Tensor order;
    if (archive.try_read("order", order)) order_ = order;
  } catch (const c10::Error& e) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reading training state ", path, ": ", e.what_without_backtrace()));
  }
  Log(absl::StrCat("resumed from ", path, " at step ", step_));
  return absl::OkStatus();
}

}  // namespace vdm
