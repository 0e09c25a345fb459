// The calibration file of a model (<model>.calibration.json, written by
// vdm-calibrate, read by vdm-server and vdm-ood-eval), free of torch.
//
// One versioned JSON document with a section per thing calibrated, so that
// what joins it later adds a section instead of a file:
//
//   {"format": "vdm-calibration", "version": 2,
//    "time_proposal": {...},            // TimeProposal (time_proposal.h)
//    "anomaly": {"fast": {...},         // Calibration (anomaly.h), the
//                                       // Gaussian over the ELBO's features
//                "thorough": {...}}}    // ThoroughCalibration (thorough.h)
//
// Every section is optional. Version 1 files ({"format":
// "vdm-calibration/1", ...}: the Gaussian alone at the top level) still
// load, as a file with only "anomaly.fast". Unknown top-level sections are
// ignored (a newer writer may add some); a malformed known section is an
// error naming it. An anomaly.thorough section written before the level's
// local group (no "local_neighbours") is skipped, with a line in `skipped`
// saying so: the rest of the file still serves, and the thorough level waits
// for vdm-calibrate.
//
// Thread-safe: the parsed objects are immutable.
#ifndef VDM_MODEL_VDM_CALIBRATION_FILE_H_
#define VDM_MODEL_VDM_CALIBRATION_FILE_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/vdm/anomaly.h"
#include "model/vdm/thorough.h"
#include "model/vdm/time_proposal.h"

namespace vdm {

constexpr int kCalibrationFileVersion = 2;

struct CalibrationFile {
  // The proposal over diffusion times for ELBO scores; null = uniform.
  std::shared_ptr<const TimeProposal> time_proposal;
  // The anomaly calibration ("anomaly.fast"); null = none.
  std::shared_ptr<const Calibration> anomaly;
  // The thorough level's ("anomaly.thorough"); null = none.
  std::shared_ptr<const ThoroughCalibration> thorough;
  // Sections read but not used, each with why (for the reader to log).
  std::vector<std::string> skipped;
};

// Parses a version 1 or 2 document. An anomaly section scored with the
// time proposal (Calibration::Setup::time_proposal) needs the file's
// time_proposal section: the features would not be reproducible without it.
absl::StatusOr<CalibrationFile> ParseCalibrationFile(const std::string& text);
// The version 2 document of `file` (sections that are null are left out).
std::string CalibrationFileToJson(const CalibrationFile& file);
// ReadFile and ParseCalibrationFile; errors start with the path.
absl::StatusOr<CalibrationFile> ReadCalibrationFile(const std::string& path);

}  // namespace vdm

#endif  // VDM_MODEL_VDM_CALIBRATION_FILE_H_
