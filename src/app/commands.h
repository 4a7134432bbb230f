#pragma once

#include "app/options.h"

namespace starserve {

// `starserve generate`: every rank loads the model; rank 0 tokenizes, streams text to stdout and
// timing to stderr. Returns the process exit code.
int run_generate(const CommandLine& cl, int* argc, char*** argv);

// `starserve serve`: rank 0 runs the gRPC server and the scheduler; other ranks follow its steps.
// Runs until SIGINT/SIGTERM. Returns the process exit code.
int run_serve(const CommandLine& cl, int* argc, char*** argv);

}  // namespace starserve
