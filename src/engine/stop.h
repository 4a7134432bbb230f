// Stop strings over streamed text. Text arrives in pieces (one detokenised token at a time), so a
// stop string can be split across pieces; the matcher holds back any tail that could still grow
// into a stop string and releases it once it cannot. On a match only the text before the stop
// string is emitted (the stop string itself is excluded, as OpenAI does).
//
// Matching rule: generation ends at the first position where some stop string is complete
// (earliest end; on equal ends the longer string, i.e. the earlier start). This is what a
// byte-by-byte stream would see, so the result does not depend on how the text is split.
// Works on bytes: if the text and the stop strings are valid UTF-8, every emitted piece ends on a
// character boundary, because a held-back tail starts where a stop string starts.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace starserve {

struct StopFeedResult {
  std::string emit;      // text safe to send now (never part of a stop string)
  bool stopped = false;  // a stop string completed; nothing more will be emitted
};

class StopMatcher {
 public:
  StopMatcher() = default;
  // Empty strings are ignored (SamplingParams::validate rejects them).
  explicit StopMatcher(std::vector<std::string> stops);

  // Appends new_text. After a stop every call returns {"", true}.
  StopFeedResult feed(std::string_view new_text);
  // End of generation without a stop string: returns the held-back text (empty after a stop).
  std::string flush();

  bool stopped() const { return stopped_; }
  const std::string& held() const { return pending_; }  // text received but not yet emitted

 private:
  // Length of the longest tail of pending_ that is a proper prefix of some stop string.
  size_t hold_length() const;

  std::vector<std::string> stops_;
  std::string pending_;  // received, not emitted; never contains a complete stop string
  bool stopped_ = false;
};

}  // namespace starserve
