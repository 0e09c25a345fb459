// The model versions a server serves, by name (docs/design.md, "Model
// repository"). A repository is a directory laid out as Triton's and
// TensorFlow Serving's are:
//
//   DIR/<name>/<version>/model.pt                    the TorchScript model
//   DIR/<name>/<version>/model.pt.calibration.json   optional: its anomaly
//                                                    calibration
//   DIR/<name>/<version>/background.pt               optional: its
//                                                    background model
//   DIR/<name>/<version>/model.pt.features.pt        optional: its feature
//                                                    network (thorough level)
//
// <name> is 1-64 of [A-Za-z0-9_.-] (not starting with '.'), <version> a
// positive integer; other entries are ignored (and logged once). Each model
// serves its newest version. Sync() brings the served versions in line with
// the directory: a newer version is loaded (the contract is checked on
// every device), warmed up, and only then served; the version it replaces
// stops taking requests at once but finishes those it has (they hold it),
// and is freed after the last. A version that fails to load is reported
// (ListModels, the log, vdm_model_load_failures_total) and never serves; the
// old one keeps serving, and the failed one is not retried until its
// model.pt changes (size or modification time). A model whose folder goes
// away is unloaded the same way. `--model=PATH` is a repository of one
// (name: the file's stem, version 1).
//
// Free of torch: loading and warming up are injected (server.cc loads
// TorchScript replicas; the unit test loads fakes).
// Thread-safe: Resolve and List from any thread; Sync runs one at a time.
#ifndef VDM_SERVER_MODEL_REPOSITORY_H_
#define VDM_SERVER_MODEL_REPOSITORY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/engine.h"
#include "server/validation.h"

namespace vdm {

// A model version that serves. Immutable; every request holds the one it
// was resolved to until its response is sent, so a response comes from one
// complete version.
struct ServedModel {
  std::string name;
  int64_t version = 0;
  ModelDescription description;
  std::shared_ptr<const EngineModel> engine_model;
  // Parameters and buffers of all its replicas (and background replicas):
  // what loading it cost in model memory, a lower bound of its resident
  // size.
  int64_t memory_bytes = 0;
};

enum class VersionState { kLoading, kReady, kFailed, kUnloading };
// "loading", "ready", "failed", "unloading".
const char* VersionStateName(VersionState state);

struct VersionStatus {
  std::string name;
  int64_t version = 0;
  VersionState state = VersionState::kLoading;
  std::string error;  // why it failed (kFailed)
  int64_t memory_bytes = 0;
  bool is_default = false;  // of the model requests get when they name none
};

// The files of one version.
struct VersionFiles {
  std::string name;
  int64_t version = 0;
  std::string model_path;
  std::string calibration_path;  // empty = none; "none" = none (--model)
  std::string background_path;   // empty = none
  std::string feature_model_path;  // empty = none; "" beside (--model)
};

class ModelRepository {
 public:
  using Loader =
      std::function<absl::StatusOr<std::shared_ptr<ServedModel>>(
          const VersionFiles&)>;
  // Runs a loaded version's first requests before it serves.
  using WarmUp = std::function<absl::Status(const ServedModel&)>;
  // Told the whole list after every change (the metrics).
  using Listener = std::function<void(const std::vector<VersionStatus>&)>;

  struct Options {
    // The repository directory; empty = `single` is the whole repository.
    std::string root;
    VersionFiles single;
    // The model of requests that name none; empty = the first by name.
    std::string default_model;
    // Models (names) loaded at once; a model beyond it is refused (state
    // failed, saying so) until another leaves. A new version of a served
    // model does not count: for the swap both are loaded.
    int max_loaded_models = 8;
  };

  ModelRepository(Options options, Loader loader, WarmUp warm_up,
                  Listener listener = nullptr);

  // Scans the directory and loads, swaps and unloads as described above.
  // Returns OK, or the failures of this sync (one per line): at start-up a
  // server refuses to start with them; later they are only reported.
  absl::Status Sync();

  // The version a request names: `name` ("" = the default model) and
  // `version` (unset = the one served). INVALID_ARGUMENT for a name that
  // cannot be a model's or a version < 1; NOT_FOUND for a model or version
  // not served (saying what is), UNAVAILABLE while the model's first
  // version loads, FAILED_PRECONDITION when it failed to load.
  absl::StatusOr<std::shared_ptr<const ServedModel>> Resolve(
      const std::string& name, std::optional<int64_t> version) const;

  // Every version known: served, loading, failed, or unloading (until its
  // last request is done), sorted by name and version.
  std::vector<VersionStatus> List() const;
  std::string default_model() const;

 private:
  struct Scanned {
    VersionFiles files;
    std::string signature;  // size and mtime of model.pt
  };
  struct Unloading {
    std::weak_ptr<const ServedModel> model;
    VersionStatus status;
  };
  // The newest version of each model in the directory; UNAVAILABLE when
  // it cannot be listed.
  absl::StatusOr<std::map<std::string, Scanned>> Scan();
  // Loads and warms up `s`; serves it on success.
  absl::Status LoadVersion(const Scanned& s);
  void Retire(std::shared_ptr<const ServedModel> old)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<VersionStatus> ListLocked() const
      ABSL_SHARED_LOCKS_REQUIRED(mu_);
  std::string DefaultLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  void Notify();

  const Options options_;
  const Loader loader_;
  const WarmUp warm_up_;
  const Listener listener_;

  absl::Mutex sync_mu_;  // one Sync at a time
  std::map<std::string, bool> ignored_ ABSL_GUARDED_BY(sync_mu_);  // logged

  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<const ServedModel>> served_
      ABSL_GUARDED_BY(mu_);
  // Versions loading, or failed (with the signature they failed with), by
  // model; at most one per model.
  std::map<std::string, VersionStatus> pending_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::string> failed_signature_ ABSL_GUARDED_BY(mu_);
  mutable std::vector<Unloading> unloading_ ABSL_GUARDED_BY(mu_);
};

// Whether `name` may name a model: 1-64 of [A-Za-z0-9_.-], not starting
// with '.'.
bool IsModelName(const std::string& name);

}  // namespace vdm

#endif  // VDM_SERVER_MODEL_REPOSITORY_H_
