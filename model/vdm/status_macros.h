// Small local versions of the status macros that Debian's Abseil (20220623)
// does not ship.
#ifndef VDM_MODEL_VDM_STATUS_MACROS_H_
#define VDM_MODEL_VDM_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define VDM_CONCAT_INNER_(a, b) a##b
#define VDM_CONCAT_(a, b) VDM_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define VDM_RETURN_IF_ERROR(expr)                  \
  do {                                             \
    ::absl::Status vdm_status_ = (expr);           \
    if (!vdm_status_.ok()) return vdm_status_;     \
  } while (0)

// `VDM_ASSIGN_OR_RETURN(auto x, F());` assigns the value of a StatusOr or
// returns its error status.
#define VDM_ASSIGN_OR_RETURN(lhs, expr) \
  VDM_ASSIGN_OR_RETURN_IMPL_(VDM_CONCAT_(vdm_statusor_, __LINE__), lhs, expr)
#define VDM_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                               \
  if (!statusor.ok()) return statusor.status();         \
  lhs = std::move(statusor).value()

#endif  // VDM_MODEL_VDM_STATUS_MACROS_H_
