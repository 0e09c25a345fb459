#include "model/train/metrics.h"

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "model/vdm/image_io.h"

namespace vdm {
namespace {

// The records of a metrics file with step <= max_step.
std::vector<nlohmann::json> ReadRecords(std::istream& in, int64_t max_step) {
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j =
        nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step") ||
        !j["step"].is_number_integer()) {
      continue;  // a torn last line of a killed run
    }
    if (j["step"].get<int64_t>() <= max_step) out.push_back(std::move(j));
  }
  return out;
}

}  // namespace

void LearningCurve::Add(const nlohmann::json& record, double step_offset) {
  const std::string kind = record.value("kind", "");
  const double step = record.value("step", 0.0) + step_offset;
  if (kind == "train" && record.contains("loss")) {
    loss.emplace_back(step, record["loss"].get<double>());
  } else if (kind == "validation" && record.contains("bpd")) {
    validation.emplace_back(step, record["bpd"].get<double>());
  }
}

absl::StatusOr<LearningCurve> ReadLearningCurve(const std::string& path,
                                                double step_offset) {
  std::ifstream in(path);
  if (!in) {
    return absl::NotFoundError(absl::StrCat(
        "cannot read metrics file ", path, ": ", std::strerror(errno)));
  }
  LearningCurve curve;
  for (const auto& j : ReadRecords(in, INT64_MAX)) curve.Add(j, step_offset);
  if (curve.loss.empty() && curve.validation.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, " has no train or validation records (a vdm-train metrics "
              "file has one JSON object per line)"));
  }
  return curve;
}

MetricsLog::MetricsLog(std::string path, FILE* file)
    : path_(std::move(path)), file_(file) {}

MetricsLog::~MetricsLog() { std::fclose(file_); }

absl::StatusOr<std::unique_ptr<MetricsLog>> MetricsLog::Open(
    const std::string& path, int64_t resume_step) {
  std::vector<nlohmann::json> kept;
  if (resume_step >= 0) {
    std::ifstream in(path);
    kept = ReadRecords(in, resume_step);
    std::string text;
    for (const auto& j : kept) absl::StrAppend(&text, j.dump(), "\n");
    absl::Status written = WriteFileAtomic(path, text);
    if (!written.ok()) return written;
  }
  FILE* file = std::fopen(path.c_str(), resume_step >= 0 ? "a" : "w");
  if (file == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot open metrics file ", path, ": ", std::strerror(errno)));
  }
  std::unique_ptr<MetricsLog> log(new MetricsLog(path, file));
  for (const auto& j : kept) log->curve_.Add(j);
  return log;
}

absl::Status MetricsLog::Write(const nlohmann::json& record) {
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() ||
      std::fflush(file_) != 0) {
    return absl::InternalError(
        absl::StrCat("writing ", path_, ": ", std::strerror(errno)));
  }
  curve_.Add(record);
  return absl::OkStatus();
}

}  // namespace vdm
