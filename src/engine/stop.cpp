#include "engine/stop.h"

#include <algorithm>
#include <utility>

namespace starserve {

StopMatcher::StopMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  std::erase_if(stops_, [](const std::string& s) { return s.empty(); });
}

StopFeedResult StopMatcher::feed(std::string_view new_text) {
  StopFeedResult out;
  if (stopped_) {
    out.stopped = true;
    return out;
  }
  if (stops_.empty()) {
    out.emit.assign(new_text);
    return out;
  }
  // The held tail is shorter than the longest stop string, so searching all of pending_ costs
  // little more than searching only where a new match could end.
  pending_.append(new_text);

  size_t best_start = std::string::npos;
  size_t best_end = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t pos = pending_.find(s);
    if (pos == std::string::npos) continue;
    const size_t end = pos + s.size();
    if (end < best_end || (end == best_end && pos < best_start)) {
      best_start = pos;
      best_end = end;
    }
  }
  if (best_start != std::string::npos) {
    out.emit = pending_.substr(0, best_start);
    out.stopped = true;
    stopped_ = true;
    pending_.clear();
    return out;
  }

  const size_t keep = hold_length();
  out.emit = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return out;
}

std::string StopMatcher::flush() {
  std::string out;
  out.swap(pending_);
  return out;
}

size_t StopMatcher::hold_length() const {
  // O(sum of stop lengths^2) per feed with stop strings of at most a few hundred bytes.
  size_t best = 0;
  const std::string_view text(pending_);
  for (const std::string& s : stops_) {
    const size_t max_len = std::min(s.size() - 1, text.size());
    for (size_t len = max_len; len > best; --len) {
      if (text.substr(text.size() - len) == std::string_view(s).substr(0, len)) {
        best = len;
        break;
      }
    }
  }
  return best;
}

}  // namespace starserve
