// Writing a trained model as the served TorchScript file: metadata helpers
// and an atomic save. Plain functions: thread-compatible.
#ifndef VDM_MODEL_TRAIN_CHECKPOINT_H_
#define VDM_MODEL_TRAIN_CHECKPOINT_H_

#include <torch/script.h>

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/status.h"
#include "model/train/vlb.h"

namespace vdm {

// An evaluation as JSON: bpd, its parts, stderr, images, K, conditioning.
nlohmann::json EvalToJson(const EvalResult& result);

// The initial model's metadata as a JSON object (an empty object when it is
// not JSON), without the evaluation keys of an earlier training run.
nlohmann::json BaseMetadata(const std::string& metadata);

// The "steps" recorded in a model's metadata (0 when absent).
int64_t StepsInMetadata(const std::string& metadata);

// Runs `write(tmp)` to write path + ".tmp", then renames it to `path`, so a
// reader never sees a partial file; `what` names the file in errors. Torch
// errors thrown by `write` are caught.
absl::Status WriteAtomically(const std::string& path, const std::string& what,
                             const std::function<void(const std::string&)>& write);

// Sets the module's `metadata` attribute and saves it to `path` atomically
// (to path + ".tmp", then rename), so a reader never sees a partial file.
absl::Status SaveModuleAtomic(torch::jit::Module& module,
                              const std::string& metadata,
                              const std::string& path);

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_CHECKPOINT_H_
