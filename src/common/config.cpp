#include "common/config.h"

#include <cstdio>

#include <unistd.h>

#include <cstdlib>
#include <cstring>

namespace starserve {

bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"}) {
    if (std::getenv(var) != nullptr) return true;
  }
  return false;
}

std::optional<int64_t> injected_failure_step(int rank) {
  const char* v = std::getenv("STARSERVE_FAIL_STEP");
  if (v == nullptr) return std::nullopt;
  int r = -1;
  long long n = -1;
  if (std::sscanf(v, "%d:%lld", &r, &n) != 2 || r != rank || n < 1) return std::nullopt;
  return static_cast<int64_t>(n);
}

bool terminal_wants_colour(int fd) {
  const char* no_color = std::getenv("NO_COLOR");
  if (no_color != nullptr && no_color[0] != '\0') return false;
  const char* term = std::getenv("TERM");
  if (term != nullptr && std::strcmp(term, "dumb") == 0) return false;
  return isatty(fd) == 1;
}

void apply_library_environment() {
  // NVLink multicast (NVLS) stays off: on the shared H200 hosts a program using it can take the
  // GPUs out of service for everyone. An explicit setting in the environment wins.
  setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0);
}

}  // namespace starserve
