#include "model/train/checkpoint.h"

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace vdm {

nlohmann::json EvalToJson(const EvalResult& result) {
  return {{"bpd", result.bpd},
          {"prior_bpd", result.prior},
          {"recon_bpd", result.recon},
          {"diffusion_bpd", result.diffusion},
          {"stderr_bpd", result.stderr_bpd},
          {"images", result.images},
          {"times_per_image", result.times},
          {"conditioning", result.conditional ? "label" : "none"}};
}

nlohmann::json BaseMetadata(const std::string& metadata) {
  nlohmann::json meta =
      nlohmann::json::parse(metadata, nullptr, /*allow_exceptions=*/false);
  if (!meta.is_object()) meta = nlohmann::json::object();
  for (const char* key : {"validation", "test", "test_bpd", "test_conditional",
                          "test_bpd_conditional"}) {
    meta.erase(key);
  }
  return meta;
}

int64_t StepsInMetadata(const std::string& metadata) {
  const nlohmann::json meta =
      nlohmann::json::parse(metadata, nullptr, /*allow_exceptions=*/false);
  if (meta.is_object() && meta.contains("steps") &&
      meta["steps"].is_number_integer()) {
    return meta["steps"].get<int64_t>();
  }
  return 0;
}

absl::Status WriteAtomically(
    const std::string& path, const std::string& what,
    const std::function<void(const std::string&)>& write) {
  const std::string tmp = path + ".tmp";
  try {
    write(tmp);
  } catch (const c10::Error& e) {
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("writing ", what, " ", tmp, ": ", e.what_without_backtrace()));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::InternalError(
        absl::StrCat("renaming ", tmp, " to ", path, ": ", std::strerror(err)));
  }
  return absl::OkStatus();
}

absl::Status SaveModuleAtomic(torch::jit::Module& module,
                              const std::string& metadata,
                              const std::string& path) {
  return WriteAtomically(path, "model", [&](const std::string& tmp) {
    module.setattr("metadata", metadata);
    module.save(tmp);
  });
}

}  // namespace vdm
