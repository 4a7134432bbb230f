#pragma once

#include "app/options.h"

namespace starserve {

// `starserve generate`: every rank loads the model; rank 0 tokenizes, streams text to stdout and
// timing to stderr. Returns the process exit code.
int run_generate(const CommandLine& cl, int* argc, char*** argv);

}  // namespace starserve
