#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "engine/stop.h"

namespace starserve {
namespace {

// Feeds the pieces in order; returns everything emitted (plus flush() when no stop hit) and
// whether a stop string ended the text.
std::pair<std::string, bool> run(StopMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  for (const std::string& piece : pieces) {
    StopFeedResult r = m.feed(piece);
    out += r.emit;
    if (r.stopped) return {out, true};
  }
  out += m.flush();
  return {out, false};
}

// Reference on the whole text: cut before the stop string that completes first (earliest end,
// then earliest start), as a byte-by-byte stream would.
std::pair<std::string, bool> reference(const std::string& text, const std::vector<std::string>& stops) {
  for (size_t end = 1; end <= text.size(); ++end) {
    size_t best_start = std::string::npos;
    for (const std::string& s : stops) {
      if (s.size() <= end && text.compare(end - s.size(), s.size(), s) == 0) {
        best_start = std::min(best_start, end - s.size());
      }
    }
    if (best_start != std::string::npos) return {text.substr(0, best_start), true};
  }
  return {text, false};
}

TEST(StopMatcher, NoStopsPassesTextThrough) {
  StopMatcher m;
  for (const char* piece : {"Hello", ", ", "", "world", "</s>"}) {
    const StopFeedResult r = m.feed(piece);
    EXPECT_EQ(r.emit, piece);
    EXPECT_FALSE(r.stopped);
  }
  EXPECT_EQ(m.flush(), "");
  StopMatcher empty_only({""});  // empty stop strings are ignored
  EXPECT_EQ(empty_only.feed("abc").emit, "abc");
}

TEST(StopMatcher, StopSplitAcrossFeedsIsNeverEmitted) {
  StopMatcher m({"</s>"});
  StopFeedResult r = m.feed("Hello <");
  EXPECT_EQ(r.emit, "Hello ");
  EXPECT_FALSE(r.stopped);
  r = m.feed("/");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(m.held(), "</");
  r = m.feed("s> trailing");
  EXPECT_EQ(r.emit, "");
  EXPECT_TRUE(r.stopped);
  // After a stop nothing more comes out.
  r = m.feed("more");
  EXPECT_EQ(r.emit, "");
  EXPECT_TRUE(r.stopped);
  EXPECT_EQ(m.flush(), "");
}

TEST(StopMatcher, PartialPrefixIsHeldThenReleased) {
  StopMatcher m({"STOP"});
  StopFeedResult r = m.feed("a ST");
  EXPECT_EQ(r.emit, "a ");
  r = m.feed("O");
  EXPECT_EQ(r.emit, "");
  EXPECT_EQ(m.held(), "STO");
  r = m.feed("P!");  // "STOP" completes; it and what follows are dropped
  EXPECT_EQ(r.emit, "");
  EXPECT_TRUE(r.stopped);

  StopMatcher m2({"STOP"});
  EXPECT_EQ(m2.feed("a STO").emit, "a ");
  r = m2.feed("RM");  // "STORM" cannot become "STOP": all of it goes out
  EXPECT_EQ(r.emit, "STORM");
  EXPECT_FALSE(r.stopped);
  EXPECT_EQ(m2.held(), "");

  // A prefix still held when generation ends comes out through flush().
  StopMatcher m3({"STOP"});
  EXPECT_EQ(m3.feed("end ST").emit, "end ");
  EXPECT_EQ(m3.flush(), "ST");
}

TEST(StopMatcher, SelfOverlappingStopHoldsOnlyWhatCanStillMatch) {
  StopMatcher m({"aab"});
  EXPECT_EQ(m.feed("a").emit, "");
  EXPECT_EQ(m.feed("a").emit, "");
  EXPECT_EQ(m.feed("a").emit, "a");  // "aaa": only the last "aa" can still start "aab"
  const StopFeedResult r = m.feed("b");
  EXPECT_EQ(r.emit, "");
  EXPECT_TRUE(r.stopped);
}

TEST(StopMatcher, MultipleStopsFirstCompletedWins) {
  {
    StopMatcher m({"STOP", "END"});
    EXPECT_EQ(run(m, {"foo E", "ND bar STOP"}), std::make_pair(std::string("foo "), true));
  }
  {
    StopMatcher m({"STOP", "END"});
    EXPECT_EQ(run(m, {"foo STOP bar END"}), std::make_pair(std::string("foo "), true));
  }
  {
    // "bc" completes before "abcd" does, whether the text comes at once or in pieces.
    StopMatcher whole({"abcd", "bc"});
    EXPECT_EQ(run(whole, {"xabcd"}), std::make_pair(std::string("xa"), true));
    StopMatcher pieces({"abcd", "bc"});
    EXPECT_EQ(run(pieces, {"xab", "cd"}), std::make_pair(std::string("xa"), true));
  }
  {
    // Same end: the longer (earlier-starting) stop string is cut.
    StopMatcher m({"b", "ab"});
    EXPECT_EQ(run(m, {"xa", "b"}), std::make_pair(std::string("x"), true));
  }
  {
    // A held prefix is released as soon as the text leaves it.
    StopMatcher m({"<|im_end|>", "\n\nUser:"});
    EXPECT_EQ(m.feed("Hi.\n").emit, "Hi.");
    EXPECT_EQ(m.held(), "\n");
    EXPECT_EQ(m.feed("\nThanks").emit, "\n\nThanks");
  }
}

TEST(StopMatcher, StopAtTheVeryStart) {
  StopMatcher m({"###"});
  const StopFeedResult r = m.feed("### rest");
  EXPECT_EQ(r.emit, "");
  EXPECT_TRUE(r.stopped);
  StopMatcher split({"###"});
  EXPECT_EQ(run(split, {"#", "#", "#", "x"}), std::make_pair(std::string(""), true));
}

TEST(StopMatcher, UnicodeStopKeepsCharactersWhole) {
  // "。" is 3 bytes in UTF-8; text before it is released whole, and a held tail is a prefix of it.
  StopMatcher m({"。\n"});
  EXPECT_EQ(m.feed("日本語。").emit, "日本語");
  EXPECT_EQ(m.held(), "。");
  const StopFeedResult r = m.feed("\n次");
  EXPECT_EQ(r.emit, "");
  EXPECT_TRUE(r.stopped);
}

TEST(StopMatcher, ResultDoesNotDependOnHowTextIsSplit) {
  // Random texts and stop strings over a 3-letter alphabet (so matches and near-matches are
  // frequent), split at random points; every split must agree with the whole-text reference.
  std::mt19937 rng(2024);
  const auto random_string = [&](int min_len, int max_len) {
    std::string s(std::uniform_int_distribution<int>(min_len, max_len)(rng), 'a');
    for (char& c : s) c = static_cast<char>('a' + std::uniform_int_distribution<int>(0, 2)(rng));
    return s;
  };
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<std::string> stops;
    const int n_stops = std::uniform_int_distribution<int>(1, 3)(rng);
    for (int i = 0; i < n_stops; ++i) stops.push_back(random_string(1, 4));
    const std::string text = random_string(0, 24);
    std::vector<std::string> pieces;
    for (size_t pos = 0; pos < text.size();) {
      const size_t len = std::uniform_int_distribution<size_t>(0, 5)(rng);
      pieces.push_back(text.substr(pos, len));
      pos += len;
    }
    StopMatcher m(stops);
    ASSERT_EQ(run(m, pieces), reference(text, stops)) << "text " << text << " stops " << stops[0];
  }
}

}  // namespace
}  // namespace starserve
