// The watchdog's diagnosis (engine/watchdog.h): which ranks it names, from their heartbeats and rank 0's step.
#include <gtest/gtest.h>

#include "engine/watchdog.h"

namespace starserve {
namespace {

PeerBeat beat(int rank, double age_s, int64_t progress, bool heard = true) {
  PeerBeat p;
  p.rank = rank;
  p.host = "node" + std::to_string(rank);
  p.heard = heard;
  p.age_s = age_s;
  p.progress = progress;
  return p;
}

TEST(Watchdog, EveryRankBeatingIsNoHang) {
  EXPECT_FALSE(diagnose_silent_ranks({beat(1, 0.9, 10), beat(2, 0.1, 10)}, StepState{10, 10, 0}, 3));
  EXPECT_FALSE(diagnose_silent_ranks({}, StepState{}, 3));
}

TEST(Watchdog, NamesTheSilentRankAndItsHost) {
  const auto d = diagnose_silent_ranks({beat(1, 0.5, 7), beat(2, 4.2, 7), beat(3, 0.2, 7)}, StepState{8, 7, 4}, 3);
  ASSERT_TRUE(d);
  EXPECT_NE(d->find("rank 2 (host node2) has sent no heartbeat for 4.2 s"), std::string::npos) << *d;
  EXPECT_EQ(d->find("rank 1"), std::string::npos) << *d;
  EXPECT_EQ(d->find("rank 3"), std::string::npos) << *d;
  const auto never = diagnose_silent_ranks({beat(1, 3.5, 0, false)}, StepState{}, 3);
  ASSERT_TRUE(never);
  EXPECT_NE(never->find("rank 1 (host node1) has sent no heartbeat since the watchdog started"), std::string::npos)
      << *never;
}

// A long step on every rank (a long forward) is no hang; a rank that never received the step is.
TEST(Watchdog, LongStepNamesOnlyTheRanksThatLag) {
  // Rank 0 is in step 12 (11 completed) for 10 s; rank 1 has received step 12, rank 2 only completed step 11.
  const int64_t in12 = progress_received(12), done11 = progress_completed(11);
  EXPECT_FALSE(diagnose_silent_ranks({beat(1, 0.5, in12), beat(2, 0.5, in12)}, StepState{12, 11, 10}, 3));
  const auto d = diagnose_silent_ranks({beat(1, 0.5, in12), beat(2, 0.5, done11)}, StepState{12, 11, 10}, 3);
  ASSERT_TRUE(d);
  EXPECT_NE(d->find("step 12"), std::string::npos) << *d;
  EXPECT_NE(d->find("rank 2 (host node2) has not received it (11 steps completed)"), std::string::npos) << *d;
  EXPECT_EQ(d->find("rank 1"), std::string::npos) << *d;
  // The same lag inside the timeout is not reported yet.
  EXPECT_FALSE(diagnose_silent_ranks({beat(1, 0.5, in12), beat(2, 0.5, done11)}, StepState{12, 11, 2}, 3));
}

// Every rank has the step: one whose main thread has not run for the timeout is named (frozen inside the step);
// ranks whose main threads run (computing, or waiting inside a collective) are a long step, not a hang.
TEST(Watchdog, InsideAStepNamesTheRankWhoseMainThreadStopped) {
  const int64_t in12 = progress_received(12);
  PeerBeat running = beat(1, 0.5, in12), frozen = beat(2, 0.5, in12);
  running.main_still_s = 0.8;
  frozen.main_still_s = 9.5;
  const auto d = diagnose_silent_ranks({running, frozen}, StepState{12, 11, 10}, 3);
  ASSERT_TRUE(d);
  EXPECT_NE(d->find("step 12"), std::string::npos) << *d;
  EXPECT_NE(d->find("rank 2 (host node2) has received it but its main thread has not run for 9.5 s"),
            std::string::npos)
      << *d;
  EXPECT_EQ(d->find("rank 1"), std::string::npos) << *d;
  // Rank 0 not yet in the step for the timeout: nothing yet, however long the thread has not run (idle ranks).
  EXPECT_FALSE(diagnose_silent_ranks({running, frozen}, StepState{12, 11, 2}, 3));
  EXPECT_FALSE(diagnose_silent_ranks({running, frozen}, StepState{11, 11, 0}, 3));
  // Both run: a long forward.
  frozen.main_still_s = 1.0;
  EXPECT_FALSE(diagnose_silent_ranks({running, frozen}, StepState{12, 11, 10}, 3));
  // A rank that has not received the step is named as such, not as frozen inside it.
  PeerBeat behind = beat(2, 0.5, progress_completed(11));
  behind.main_still_s = 9.5;
  const auto b = diagnose_silent_ranks({running, behind}, StepState{12, 11, 10}, 3);
  ASSERT_TRUE(b);
  EXPECT_NE(b->find("rank 2 (host node2) has not received it"), std::string::npos) << *b;
}

// A whole process stopped (SIGSTOP) just as rank 0 began a step: its beats stop too. While its last beat is older
// than half the timeout it is not judged by its progress (which would race the silence diagnosis); it is named as
// silent once the beat is older than the timeout.
TEST(Watchdog, AStoppedProcessIsNamedSilentNotLagging) {
  const int64_t done11 = progress_completed(11);
  PeerBeat stopped = beat(1, 2.2, done11);
  stopped.main_still_s = 3.4;
  EXPECT_FALSE(diagnose_silent_ranks({stopped}, StepState{12, 11, 3.1}, 3));
  stopped.age_s = 3.2;
  const auto d = diagnose_silent_ranks({stopped}, StepState{12, 11, 4.1}, 3);
  ASSERT_TRUE(d);
  EXPECT_NE(d->find("rank 1 (host node1) has sent no heartbeat for 3.2 s"), std::string::npos) << *d;
  EXPECT_EQ(d->find("not received"), std::string::npos) << *d;
}

// A worker that failed a step is named at once, with the step, without waiting for the timeout.
TEST(Watchdog, NamesARankThatFailedAStepAtOnce) {
  const auto d = diagnose_silent_ranks({beat(1, 0.5, progress_received(7)), beat(2, 0.2, progress_failed(7))},
                                       StepState{7, 6, 0.1}, 30);
  ASSERT_TRUE(d);
  EXPECT_NE(d->find("rank 2 (host node2) failed step 7"), std::string::npos) << *d;
  EXPECT_EQ(d->find("rank 1"), std::string::npos) << *d;
  EXPECT_FALSE(diagnose_silent_ranks({beat(1, 0.5, progress_completed(7))}, StepState{7, 7, 0}, 30));
}

// The other ranks' view of rank 0: silent past the timeout is a diagnosis naming rank 0, within it none.
TEST(Watchdog, OtherRanksNameASilentRankZero) {
  EXPECT_FALSE(diagnose_silent_root(1.2, 3));
  EXPECT_FALSE(diagnose_silent_root(3.0, 3));
  const auto found = diagnose_silent_root(4.5, 3);
  ASSERT_TRUE(found);
  EXPECT_NE(found->find("rank 0 has answered no heartbeat for 4.5 s"), std::string::npos) << *found;
}

}  // namespace
}  // namespace starserve
