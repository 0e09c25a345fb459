// libFuzzer target: the model metadata (a JSON string recorded in every
// exported model) as the project reads it. Run by scripts/fuzz.sh.
//
// The readers are not standalone functions the fuzzer could call: they sit
// in torch-linked code (Describe in server/server.cc, BaseMetadata and
// StepsInMetadata in model/train/checkpoint.cc, the "classes" read in
// tools/classifier.cc). So this file parses with nlohmann::json::parse(data,
// nullptr, false) exactly as they do and repeats their field reads; keep the
// copies below in step with those functions.
//
// Checks: no exception escapes (an uncaught nlohmann::json exception would
// terminate the server or the trainer), and the metadata the trainer writes
// back (BaseMetadata(...).dump()) parses again.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace {

// server/server.cc, Describe: the reference BPD of the anomaly score.
double ReferenceBpd(const std::string& metadata) {
  double reference_bpd = 0;
  const auto meta = nlohmann::json::parse(metadata, nullptr, false);
  if (meta.is_object() && meta.contains("test_bpd") &&
      meta["test_bpd"].is_number()) {
    reference_bpd = meta["test_bpd"].get<double>();
  }
  return reference_bpd;
}

// model/train/checkpoint.cc, BaseMetadata.
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

// model/train/checkpoint.cc, StepsInMetadata.
int64_t StepsInMetadata(const std::string& metadata) {
  const nlohmann::json meta =
      nlohmann::json::parse(metadata, nullptr, /*allow_exceptions=*/false);
  if (meta.is_object() && meta.contains("steps") &&
      meta["steps"].is_number_integer()) {
    return meta["steps"].get<int64_t>();
  }
  return 0;
}

// tools/classifier.cc, ImageClassifier::Load: the class names.
std::vector<std::string> ClassNames(const std::string& metadata,
                                    int num_classes) {
  std::vector<std::string> names(static_cast<size_t>(num_classes), "?");
  nlohmann::json meta =
      nlohmann::json::parse(metadata, nullptr, /*allow_exceptions=*/false);
  if (meta.is_object() && meta.contains("classes") &&
      meta["classes"].is_array() &&
      meta["classes"].size() == static_cast<size_t>(num_classes)) {
    for (int c = 0; c < num_classes; ++c) {
      if (meta["classes"][c].is_string()) names[c] = meta["classes"][c];
    }
  }
  return names;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string metadata(reinterpret_cast<const char*>(data), size);
  volatile double bpd = ReferenceBpd(metadata);
  (void)bpd;
  volatile int64_t steps = StepsInMetadata(metadata);
  (void)steps;
  (void)ClassNames(metadata, 10);
  // The trainer writes BaseMetadata plus its own keys back into the model it
  // saves; what it writes must parse again.
  const std::string written = BaseMetadata(metadata).dump();
  if (nlohmann::json::parse(written, nullptr, false).is_discarded()) {
    std::abort();
  }
  return 0;
}
