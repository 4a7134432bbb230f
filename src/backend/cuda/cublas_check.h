// cuBLAS's part in the one checking family (common/check.h): SS_CHECK_CALL(cublasLtMatmul(...)) in
// the CUDA backend aborts with file:line, the call and the status name. This folder is the only
// code that includes cuBLAS.
#pragma once

#include <string>

#include <cublasLt.h>

#include "common/check.h"

namespace starserve {

inline bool call_ok(cublasStatus_t s) { return s == CUBLAS_STATUS_SUCCESS; }
inline std::string call_message(cublasStatus_t s) {
  return std::string(cublasLtGetStatusString(s)) + " (status " + std::to_string(static_cast<int>(s)) + ")";
}

}  // namespace starserve
