#include "server/model_repository.h"

#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <utility>

#include <glog/logging.h>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace vdm {
namespace {

namespace fs = std::filesystem;

// "SIZE:MTIME_NS" of `path`, or "" when it cannot be read: a file rewritten
// in place gets a new signature, and a failed version is retried.
std::string Signature(const std::string& path) {
  struct stat st {};
  if (stat(path.c_str(), &st) != 0) return "";
  return absl::StrCat(st.st_size, ":", st.st_mtim.tv_sec, ".",
                      st.st_mtim.tv_nsec);
}

bool IsVersion(const std::string& s, int64_t* version) {
  if (s.empty() || s.size() > 18 || s[0] == '0') return false;
  for (char c : s) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
  }
  return absl::SimpleAtoi(s, version) && *version > 0;
}

}  // namespace

const char* VersionStateName(VersionState state) {
  switch (state) {
    case VersionState::kLoading:
      return "loading";
    case VersionState::kReady:
      return "ready";
    case VersionState::kFailed:
      return "failed";
    case VersionState::kUnloading:
      return "unloading";
  }
  return "unknown";
}

bool IsModelName(const std::string& name) {
  if (name.empty() || name.size() > 64 || name[0] == '.') return false;
  for (char c : name) {
    const bool ok = absl::ascii_isalnum(static_cast<unsigned char>(c)) ||
                    c == '_' || c == '-' || c == '.';
    if (!ok) return false;
  }
  return true;
}

ModelRepository::ModelRepository(Options options, Loader loader,
                                 WarmUp warm_up, Listener listener)
    : options_(std::move(options)),
      loader_(std::move(loader)),
      warm_up_(std::move(warm_up)),
      listener_(std::move(listener)) {}

absl::StatusOr<std::map<std::string, ModelRepository::Scanned>>
ModelRepository::Scan() {
  std::map<std::string, Scanned> newest;
  if (options_.root.empty()) {
    newest[options_.single.name] = {options_.single,
                                    Signature(options_.single.model_path)};
    return newest;
  }
  // Logs an entry that is not a model or version once, not every poll.
  const auto ignore = [this](const fs::path& p, const char* why) {
    if (ignored_.emplace(p.string(), true).second) {
      LOG(WARNING) << "vdm-server: model repository: ignoring " << p << " ("
                   << why << ")";
    }
  };
  std::error_code error;
  for (const fs::directory_entry& model : fs::directory_iterator(
           options_.root, fs::directory_options::skip_permission_denied,
           error)) {
    const std::string name = model.path().filename().string();
    if (!model.is_directory(error)) continue;
    if (!IsModelName(name)) {
      if (name[0] != '.') ignore(model.path(), "not a model name: [A-Za-z0-9_.-], at most 64");
      continue;
    }
    std::error_code inner;
    for (const fs::directory_entry& version : fs::directory_iterator(
             model.path(), fs::directory_options::skip_permission_denied,
             inner)) {
      int64_t number = 0;
      const std::string folder = version.path().filename().string();
      if (!version.is_directory()) continue;
      if (!IsVersion(folder, &number)) {
        if (folder[0] != '.') ignore(version.path(), "not a version number");
        continue;
      }
      const fs::path pt = version.path() / "model.pt";
      if (!fs::exists(pt, inner)) {
        ignore(version.path(), "no model.pt");
        continue;
      }
      auto it = newest.find(name);
      if (it != newest.end() && it->second.files.version >= number) continue;
      Scanned s;
      s.files.name = name;
      s.files.version = number;
      s.files.model_path = pt.string();
      const fs::path calibration = version.path() / "model.pt.calibration.json";
      s.files.calibration_path =
          fs::exists(calibration, inner) ? calibration.string() : "none";
      const fs::path background = version.path() / "background.pt";
      if (fs::exists(background, inner)) {
        s.files.background_path = background.string();
      }
      const fs::path features = version.path() / "model.pt.features.pt";
      s.files.feature_model_path =
          fs::exists(features, inner) ? features.string() : "none";
      s.signature = Signature(pt.string());
      newest[name] = std::move(s);
    }
    if (inner) error = inner;
  }
  // A repository that cannot be listed (a volume being remounted, say) is
  // not an empty one: nothing is unloaded for it.
  if (error) {
    return absl::UnavailableError(absl::StrCat(
        "model repository ", options_.root, ": cannot list it: ",
        error.message(), "; the served versions keep serving"));
  }
  return newest;
}

absl::Status ModelRepository::Sync() {
  absl::MutexLock sync(&sync_mu_);
  std::vector<std::string> failures;
  absl::StatusCode code = absl::StatusCode::kFailedPrecondition;
  const absl::StatusOr<std::map<std::string, Scanned>> listed = Scan();
  if (!listed.ok()) {
    LOG(WARNING) << "vdm-server: " << listed.status().message();
    return listed.status();
  }
  const std::map<std::string, Scanned>& scanned = *listed;
  if (!options_.root.empty() && scanned.empty()) {
    failures.push_back(absl::StrCat("model repository ", options_.root,
                                    " holds no model (DIR/NAME/VERSION/model.pt)"));
  }
  // Models whose folders are gone leave first, making room for others.
  {
    absl::MutexLock lock(&mu_);
    for (auto it = served_.begin(); it != served_.end();) {
      if (scanned.count(it->first) == 0) {
        LOG(INFO) << "vdm-server: model " << it->first << " version "
                  << it->second->version
                  << " left the repository: unloading it";
        Retire(std::move(it->second));
        it = served_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto it = pending_.begin(); it != pending_.end();) {
      it = scanned.count(it->first) == 0 ? pending_.erase(it) : std::next(it);
    }
  }
  for (const auto& [name, s] : scanned) {
    bool load = false;
    {
      absl::MutexLock lock(&mu_);
      auto served = served_.find(name);
      const bool is_served =
          served != served_.end() && served->second->version == s.files.version;
      auto failed = failed_signature_.find(name + "/" + std::to_string(s.files.version));
      const bool still_failed =
          failed != failed_signature_.end() && failed->second == s.signature;
      if (!is_served && !still_failed) {
        if (served == served_.end() &&
            static_cast<int>(served_.size()) >= options_.max_loaded_models) {
          VersionStatus& p = pending_[name];
          const std::string why = absl::StrCat(
              "not loaded: ", served_.size(), " models are loaded, "
              "--max_loaded_models=", options_.max_loaded_models);
          if (p.error != why || p.version != s.files.version) {
            LOG(WARNING) << "vdm-server: model " << name << " version "
                         << s.files.version << ": " << why;
          }
          p = {name, s.files.version, VersionState::kFailed, why, 0, false};
        } else {
          pending_[name] = {name, s.files.version, VersionState::kLoading,
                            "", 0, false};
          load = true;
        }
      }
    }
    if (!load) continue;
    Notify();
    const absl::Status loaded = LoadVersion(s);
    if (!loaded.ok()) {
      if (failures.empty()) code = loaded.code();
      failures.push_back(std::string(loaded.message()));
    }
    Notify();
  }
  Notify();
  if (failures.empty()) return absl::OkStatus();
  return absl::Status(code, absl::StrJoin(failures, "\n"));
}

absl::Status ModelRepository::LoadVersion(const Scanned& s) {
  const VersionFiles& f = s.files;
  LOG(INFO) << "vdm-server: loading model " << f.name << " version "
            << f.version << " from " << f.model_path;
  absl::StatusOr<std::shared_ptr<ServedModel>> model = loader_(f);
  absl::Status status = model.status();
  if (status.ok()) {
    (*model)->name = f.name;
    (*model)->version = f.version;
    status = warm_up_ ? warm_up_(**model) : absl::OkStatus();
  }
  absl::MutexLock lock(&mu_);
  if (!status.ok()) {
    const std::string error =
        absl::StrCat("model ", f.name, " version ", f.version, " (",
                     f.model_path, "): ", status.message());
    LOG(ERROR) << "vdm-server: " << error
               << (served_.count(f.name) != 0 ? "; the served version keeps serving"
                                              : "");
    failed_signature_[f.name + "/" + std::to_string(f.version)] = s.signature;
    pending_[f.name] = {f.name, f.version, VersionState::kFailed, error, 0,
                        false};
    return absl::Status(status.code(), error);
  }
  pending_.erase(f.name);
  std::shared_ptr<const ServedModel>& slot = served_[f.name];
  if (slot != nullptr) {
    LOG(INFO) << "vdm-server: model " << f.name << " version " << f.version
              << " serves; version " << slot->version
              << " drains its requests and unloads";
    Retire(std::move(slot));
  } else {
    LOG(INFO) << "vdm-server: model " << f.name << " version " << f.version
              << " serves (" << (*model)->memory_bytes / (1 << 20)
              << " MiB of parameters)";
  }
  slot = *std::move(model);
  return absl::OkStatus();
}

void ModelRepository::Retire(std::shared_ptr<const ServedModel> old) {
  VersionStatus status{old->name, old->version, VersionState::kUnloading, "",
                       old->memory_bytes, false};
  unloading_.push_back({old, std::move(status)});
  // `old` goes out of scope here: requests that still hold it keep it.
}

absl::StatusOr<std::shared_ptr<const ServedModel>> ModelRepository::Resolve(
    const std::string& requested, std::optional<int64_t> version) const {
  if (!requested.empty() && !IsModelName(requested)) {
    return absl::InvalidArgumentError(
        "model: not a model name (1-64 of [A-Za-z0-9_.-], not starting with "
        "'.')");
  }
  if (version.has_value() && *version < 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "version: ", *version, " is not a version (versions are >= 1)"));
  }
  absl::MutexLock lock(&mu_);
  const std::string name = requested.empty() ? DefaultLocked() : requested;
  auto it = served_.find(name);
  if (it == served_.end()) {
    auto p = pending_.find(name);
    if (p != pending_.end() && p->second.state == VersionState::kLoading) {
      return absl::UnavailableError(absl::StrCat(
          "model '", name, "' is loading (version ", p->second.version,
          "); retry shortly"));
    }
    if (p != pending_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("model '", name, "' is not served: ", p->second.error));
    }
    std::vector<std::string> names;
    for (const auto& [n, m] : served_) names.push_back(n);
    return absl::NotFoundError(absl::StrCat(
        "model '", name, "' is not in the repository (serving: ",
        names.empty() ? "none" : absl::StrJoin(names, ", "), ")"));
  }
  if (version.has_value() && *version != it->second->version) {
    return absl::NotFoundError(absl::StrCat(
        "version ", *version, " of model '", name,
        "' is not served (serving version ", it->second->version, ")"));
  }
  return it->second;
}

std::string ModelRepository::default_model() const {
  absl::MutexLock lock(&mu_);
  return DefaultLocked();
}

std::string ModelRepository::DefaultLocked() const {
  if (!options_.default_model.empty()) return options_.default_model;
  if (options_.root.empty()) return options_.single.name;
  return served_.empty() ? std::string() : served_.begin()->first;
}

std::vector<VersionStatus> ModelRepository::List() const {
  absl::MutexLock lock(&mu_);
  return ListLocked();
}

std::vector<VersionStatus> ModelRepository::ListLocked() const {
  // A version that unloads leaves the list once its last request is done.
  unloading_.erase(std::remove_if(unloading_.begin(), unloading_.end(),
                                  [](const Unloading& u) {
                                    return u.model.expired();
                                  }),
                   unloading_.end());
  std::vector<VersionStatus> list;
  const std::string default_name = DefaultLocked();
  for (const auto& [name, m] : served_) {
    list.push_back({name, m->version, VersionState::kReady, "",
                    m->memory_bytes, name == default_name});
  }
  for (const auto& [name, p] : pending_) list.push_back(p);
  for (const Unloading& u : unloading_) list.push_back(u.status);
  std::sort(list.begin(), list.end(),
            [](const VersionStatus& a, const VersionStatus& b) {
              return std::tie(a.name, a.version) < std::tie(b.name, b.version);
            });
  return list;
}

void ModelRepository::Notify() {
  if (!listener_) return;
  listener_(List());
}

}  // namespace vdm
