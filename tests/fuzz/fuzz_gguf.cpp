// libFuzzer target for the GGUF reader: any input must parse or give a kDataLoss that names a byte
// offset, and every tensor of a file that parses must dequantize (the reader has already checked
// that its bytes lie inside the file).
//
// Seeds (tests/fuzz/corpus/) are tiny valid files written with gguf-py's GGUFWriter: a v3 file with
// strings, arrays and F32/F16/Q4_0/Q8_0/Q4_K/Q6_K tensors, and one with alignment 64.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/check.h"
#include "model/dequant.h"
#include "model/gguf.h"

namespace {

using starserve::gguf::GgufFile;
using starserve::gguf::Value;
using starserve::gguf::ValueType;

// Dequantizing is linear in the tensor size; bigger tensors only slow the fuzzer down.
constexpr int64_t kMaxDequantElements = 1 << 16;

void touch(const Value& v) {
  (void)v.as_i64();
  (void)v.as_u64();
  (void)v.as_f64();
  (void)v.as_bool();
  (void)v.as_string();
  (void)v.summary();
  if (v.type() == ValueType::kArray) {
    const uint64_t n = v.size() < 64 ? v.size() : 64;
    for (uint64_t i = 0; i < n; ++i) touch(v.at(i));
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed = GgufFile::from_memory(data, size);
  if (!parsed.ok()) {
    const std::string& msg = parsed.status().message();
    SS_CHECK(parsed.status().code() == starserve::StatusCode::kDataLoss, "{}", parsed.status().to_string());
    SS_CHECK(msg.find("byte") != std::string::npos, "error without a byte offset: {}", msg);
    return 0;
  }
  const GgufFile& f = **parsed;
  for (const auto& kv : f.metadata()) {
    touch(kv.value);
    (void)f.get_u32(kv.key);
    (void)f.get_f32(kv.key);
    (void)f.get_string_array(kv.key);
    (void)f.get_i32_array(kv.key);
    (void)f.get_f32_array(kv.key);
  }
  std::vector<float> out;
  for (const auto& t : f.tensors()) {
    SS_CHECK(f.find_tensor(t.name) != nullptr, "tensor '{}' not indexed", t.name);
    if (!starserve::gguf::can_dequantize(t.type) || t.n_elements > kMaxDequantElements) continue;
    out.assign(static_cast<size_t>(t.n_elements), 0.0f);
    const starserve::Status st = starserve::gguf::dequantize(t.type, t.data, t.n_bytes, out.data(), t.n_elements);
    SS_CHECK(st.ok(), "tensor '{}': {}", t.name, st.to_string());
  }
  return 0;
}
