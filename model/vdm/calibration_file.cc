#include "model/vdm/calibration_file.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "model/vdm/image_io.h"
#include "model/vdm/status_macros.h"
#include "model/vdm/thorough.h"
#include "nlohmann/json.hpp"

namespace vdm {
namespace {

constexpr char kFormat[] = "vdm-calibration";
constexpr char kFormatV1[] = "vdm-calibration/1";

// A section's error, prefixed by the section's name in the file.
absl::Status InSection(const std::string& name, const absl::Status& s) {
  return absl::InvalidArgumentError(
      absl::StrCat("calibration file section ", name, ": ", s.message()));
}

}  // namespace

absl::StatusOr<CalibrationFile> ParseCalibrationFile(const std::string& text) {
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        "calibration file: not a JSON object");
  }
  CalibrationFile file;
  const std::string format =
      j.contains("format") && j["format"].is_string() ? j["format"].get<std::string>()
                                                      : "";
  if (format == kFormatV1) {
    // Version 1: the Gaussian alone, at the top level.
    absl::StatusOr<Calibration> c = Calibration::FromJsonValue(j);
    if (!c.ok()) return InSection("anomaly.fast (version 1)", c.status());
    file.anomaly = std::make_shared<const Calibration>(*std::move(c));
    return file;
  }
  if (format != kFormat) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration file: format is '", format, "', not '", kFormat,
        "' (or '", kFormatV1, "')"));
  }
  if (!j.contains("version") || !j["version"].is_number_integer()) {
    return absl::InvalidArgumentError("calibration file: no integer version");
  }
  const int version = j["version"].get<int>();
  if (version < 2 || version > kCalibrationFileVersion) {
    return absl::InvalidArgumentError(absl::StrCat(
        "calibration file: version ", version, " is not one this build reads (2..",
        kCalibrationFileVersion, ")"));
  }
  if (j.contains("time_proposal")) {
    absl::StatusOr<TimeProposal> q = TimeProposal::FromJsonValue(j["time_proposal"]);
    if (!q.ok()) return InSection("time_proposal", q.status());
    file.time_proposal = std::make_shared<const TimeProposal>(*std::move(q));
  }
  if (j.contains("anomaly")) {
    const nlohmann::json& a = j["anomaly"];
    if (!a.is_object()) {
      return InSection("anomaly", absl::InvalidArgumentError("not a JSON object"));
    }
    if (a.contains("fast")) {
      absl::StatusOr<Calibration> c = Calibration::FromJsonValue(a["fast"]);
      if (!c.ok()) return InSection("anomaly.fast", c.status());
      file.anomaly = std::make_shared<const Calibration>(*std::move(c));
    }
    if (a.contains("thorough") && a["thorough"].is_object() &&
        !a["thorough"].contains("local_neighbours")) {
      file.skipped.push_back(
          "anomaly.thorough: written before the thorough level's local group "
          "(no local_neighbours); the thorough level is off until vdm-calibrate "
          "is re-run with the feature network");
    } else if (a.contains("thorough")) {
      absl::StatusOr<ThoroughCalibration> c =
          ThoroughCalibration::FromJsonValue(a["thorough"]);
      if (!c.ok()) return InSection("anomaly.thorough", c.status());
      file.thorough = std::make_shared<const ThoroughCalibration>(*std::move(c));
    }
  }
  if (file.thorough != nullptr && file.thorough->setup().elbo.time_proposal &&
      file.time_proposal == nullptr) {
    return InSection("anomaly.thorough",
                     absl::InvalidArgumentError(
                         "scored with a time proposal, but the file has no "
                         "time_proposal section"));
  }
  if (file.anomaly != nullptr && file.anomaly->setup().time_proposal &&
      file.time_proposal == nullptr) {
    return InSection("anomaly.fast",
                     absl::InvalidArgumentError(
                         "scored with a time proposal, but the file has no "
                         "time_proposal section"));
  }
  return file;
}

std::string CalibrationFileToJson(const CalibrationFile& file) {
  nlohmann::json j;
  j["format"] = kFormat;
  j["version"] = kCalibrationFileVersion;
  if (file.time_proposal != nullptr) {
    file.time_proposal->ToJsonValue(&j["time_proposal"]);
  }
  if (file.anomaly != nullptr) file.anomaly->ToJsonValue(&j["anomaly"]["fast"]);
  if (file.thorough != nullptr) {
    file.thorough->ToJsonValue(&j["anomaly"]["thorough"]);
  }
  return j.dump(1);
}

absl::StatusOr<CalibrationFile> ReadCalibrationFile(const std::string& path) {
  VDM_ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  absl::StatusOr<CalibrationFile> file = ParseCalibrationFile(text);
  if (!file.ok()) {
    return absl::Status(file.status().code(),
                        absl::StrCat(path, ": ", file.status().message()));
  }
  return file;
}

}  // namespace vdm
