// starserve: parse the command line, then hand over to the command.
#include <cstdio>

#include "app/commands.h"
#include "app/options.h"

int main(int argc, char** argv) {
  int exit_code = 0;
  auto cl = starserve::parse_command_line(argc, argv, &exit_code);
  if (!cl) return exit_code;
  if (cl->command == "generate") return starserve::run_generate(*cl, &argc, &argv);
  if (cl->command == "serve") return starserve::run_serve(*cl, &argc, &argv);
  std::fprintf(stderr, "unknown command %s\n", cl->command.c_str());
  return 2;
}
