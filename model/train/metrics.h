// The trainer's metrics file: one JSON object per line (JSONL), appended as
// training goes, and the learning curve read back from it.
//
//   {"kind":"train","step":500,"loss":3.91,"steps_per_s":0.9,"lr":0.001,...}
//   {"kind":"validation","step":500,"bpd":3.72,"prior_bpd":...,...}
//   {"kind":"test","step":2000,"bpd":3.35,...}
//
// Thread-compatible.
#ifndef VDM_MODEL_TRAIN_METRICS_H_
#define VDM_MODEL_TRAIN_METRICS_H_

#include <cstdint>
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace vdm {

class MetricsLog {
 public:
  // Opens `path`. A new run (resume_step < 0) starts an empty file; a
  // resumed run keeps the records up to resume_step and drops later ones
  // (steps that a killed run did after its last checkpoint and that the
  // resumed run will do again).
  static absl::StatusOr<std::unique_ptr<MetricsLog>> Open(
      const std::string& path, int64_t resume_step);
  ~MetricsLog();

  // Appends one record (an object with "kind" and "step") and flushes.
  absl::Status Write(const nlohmann::json& record);

  // (step, value) of every "train" record's loss and every "validation"
  // record's bpd, in file order.
  const std::vector<std::pair<double, double>>& loss() const { return loss_; }
  const std::vector<std::pair<double, double>>& validation() const {
    return validation_;
  }
  const std::string& path() const { return path_; }

 private:
  MetricsLog(std::string path, FILE* file);
  void Remember(const nlohmann::json& record);

  const std::string path_;
  FILE* const file_;
  std::vector<std::pair<double, double>> loss_;
  std::vector<std::pair<double, double>> validation_;
};

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_METRICS_H_
