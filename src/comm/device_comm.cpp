// The parts of the device-collective API that every build has: which GPU a rank drives and, in
// builds without NCCL, the NCCL factory's answer (nccl_communicator.cpp is compiled only with NCCL).
#include "comm/communicator.h"

namespace starserve {

int pick_local_device(const WorldLayout& layout, int n_devices) {
  if (n_devices < 1) return -1;
  return layout.local_rank % n_devices;
}

#ifndef STARSERVE_HAVE_NCCL
Result<std::unique_ptr<Communicator>> make_nccl_communicator(std::unique_ptr<Communicator>, int) {
  return unimplemented("this build has no NCCL (configure found no CUDA or no nccl.h/libnccl); "
                       "rebuild on a machine with both for device collectives");
}
#endif

}  // namespace starserve
