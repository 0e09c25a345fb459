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

// A learning curve: (step, value) of the "train" losses and of the
// "validation" BPDs, in file order.
struct LearningCurve {
  std::vector<std::pair<double, double>> loss;
  std::vector<std::pair<double, double>> validation;

  // Adds `record` if it is a train or validation record, at its step plus
  // step_offset.
  void Add(const nlohmann::json& record, double step_offset = 0);
};

// The learning curve of a metrics file, steps shifted by step_offset (to put
// a continued run after the steps of the model it started from). Lines that
// are not records (the torn last line of a killed run) are skipped; a file
// that cannot be read, or has no train or validation record, is an error.
absl::StatusOr<LearningCurve> ReadLearningCurve(const std::string& path,
                                                double step_offset = 0);

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

  // Every "train" record's loss and every "validation" record's bpd.
  const LearningCurve& curve() const { return curve_; }
  const std::string& path() const { return path_; }

 private:
  MetricsLog(std::string path, FILE* file);
  const std::string path_;
  FILE* const file_;
  LearningCurve curve_;
};

}  // namespace vdm

#endif  // VDM_MODEL_TRAIN_METRICS_H_
