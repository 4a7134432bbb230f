// Command-line options of the `starserve` executable, parsed into Config (common/config.h) plus the
// per-command inputs. Parsing happens once in main(); the rest of the program sees plain values.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "common/config.h"
#include "engine/sampling.h"

namespace starserve {

struct GenerateInputs {
  std::string prompt;        // --prompt
  std::string context_file;  // --context-file (star split form)
  std::string query;         // --query
  std::string system;        // --system (chat only)
  bool chat = false;         // --chat: apply the model's chat template
  bool print_entropy = false;
  SamplingParams sampling;
};

struct CommandLine {
  std::string command;  // "generate" | "serve"
  Config config;
  GenerateInputs generate;
};

// argv -> CommandLine. Returns an error message for bad flags (CLI11 prints help itself).
// exit_code is set when the program should exit right away (help, parse error).
std::optional<CommandLine> parse_command_line(int argc, char** argv, int* exit_code);

// The values in force, one per line, for the start-up log.
std::string describe_config(const Config& config);

const char* attention_mode_name(AttentionMode mode);
const char* exact_layout_name(ExactLayout layout);

}  // namespace starserve
