// The main() of the SPMD test binaries: MPI up, gtest on every rank, the report printed by rank 0
// only, and the job failing when any rank failed.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>

#include "comm/communicator.h"

namespace starserve {

// Sets *comm for the tests before running them; returns the process exit code.
inline int run_mpi_gtest(int argc, char** argv, Communicator** comm_out) {
  auto comm = make_mpi_communicator(&argc, &argv);
  if (!comm.ok()) {
    std::fprintf(stderr, "%s\n", comm.status().to_string().c_str());
    return 1;
  }
  *comm_out = comm->get();
  ::testing::InitGoogleTest(&argc, argv);
  if ((*comm_out)->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  float failed = static_cast<float>(rc != 0);
  (void)(*comm_out)->all_reduce_max(&failed, 1);
  *comm_out = nullptr;
  return failed > 0 ? 1 : 0;
}

}  // namespace starserve
