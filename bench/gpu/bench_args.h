// Comma-separated command-line lists of the GPU benchmarks ("16384,32768", "global,star").
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace starserve::bench {

inline std::vector<std::string> split_commas(const char* s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(item);
  return out;
}

inline std::vector<int64_t> split_integers(const char* s) {
  std::vector<int64_t> out;
  for (const std::string& item : split_commas(s)) out.push_back(std::stoll(item));
  return out;
}

}  // namespace starserve::bench
