// The CUDA backend's --prefill-kernel names map to the kernels they name, and any other name is
// refused with kInvalidArgument and a message listing the valid ones. Parsing only: no GPU needed.
#include <gtest/gtest.h>

#include <string>

#include "backend/backend.h"

namespace starserve {
namespace {

TEST(BackendOptions, PrefillKernelNames) {
  using Prefill = CudaBackendOptions::Prefill;
  const struct {
    const char* name;
    Prefill want;
  } cases[] = {{"auto", Prefill::kAuto}, {"wgmma", Prefill::kWgmma}, {"mma", Prefill::kMma}};
  for (const auto& c : cases) {
    const auto got = parse_prefill_kernel(c.name);
    ASSERT_TRUE(got.ok()) << c.name << ": " << got.status().message();
    EXPECT_EQ(*got, c.want) << c.name;
  }
  EXPECT_EQ(CudaBackendOptions{}.prefill, Prefill::kAuto);  // the backend's own default is auto
  // The baselines (kernels/baselines) and the names they had are not choices.
  for (const char* bad : {"fa3", "", "WGMMA", "mma-m256", "wmma", "mma-m64", "mma-m128", "mma-m64-lazy"}) {
    const auto got = parse_prefill_kernel(bad);
    ASSERT_FALSE(got.ok()) << '"' << bad << '"';
    EXPECT_EQ(got.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(got.status().message().find("\"" + std::string(bad) + "\" is not one of auto, wgmma, mma"),
              std::string::npos)
        << got.status().message();
  }
}

}  // namespace
}  // namespace starserve
