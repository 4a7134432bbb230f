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
  } cases[] = {{"auto", Prefill::kDefault},         {"wgmma", Prefill::kWgmma},
               {"mma", Prefill::kMmaM128},          {"mma-m128", Prefill::kMmaM128},
               {"mma-m64", Prefill::kMmaM64},       {"mma-m64-lazy", Prefill::kMmaM64Lazy},
               {"wmma", Prefill::kWmma}};
  for (const auto& c : cases) {
    const auto got = parse_prefill_kernel(c.name);
    ASSERT_TRUE(got.ok()) << c.name << ": " << got.status().message();
    EXPECT_EQ(*got, c.want) << c.name;
  }
  EXPECT_EQ(CudaBackendOptions{}.prefill, Prefill::kDefault);  // the backend's own default is auto
  for (const char* bad : {"fa3", "", "WGMMA", "mma-m256"}) {
    const auto got = parse_prefill_kernel(bad);
    ASSERT_FALSE(got.ok()) << '"' << bad << '"';
    EXPECT_EQ(got.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(got.status().message().find("auto, wgmma, mma"), std::string::npos) << got.status().message();
  }
}

}  // namespace
}  // namespace starserve
