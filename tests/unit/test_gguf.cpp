// GGUF reader, malformed-input handling and the GGUF WeightSource. Files are built in memory by a
// small writer below (independent of the reader: it only appends fields in the documented order),
// plus one test on the real SmolLM2 file checked against the python gguf package.
#include <gtest/gtest.h>

#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "model/dequant.h"
#include "model/gguf.h"
#include "model/gguf_source.h"

#ifndef STARSERVE_DEFAULT_MODEL
#error "STARSERVE_DEFAULT_MODEL must name the SmolLM2 GGUF file (tests/CMakeLists.txt defines it)"
#endif

namespace starserve::gguf {
namespace {

// ---------------------------------------------------------------------------------------------
// Writer

struct Bytes {
  std::vector<uint8_t> data;

  template <typename T>
  Bytes& put(T v) {
    const size_t at = data.size();
    data.resize(at + sizeof(T));
    std::memcpy(data.data() + at, &v, sizeof(T));
    return *this;
  }
  Bytes& str(std::string_view s) {
    put<uint64_t>(s.size());
    data.insert(data.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& append(const Bytes& b) {
    data.insert(data.end(), b.data.begin(), b.data.end());
    return *this;
  }
};

// Encoded array value: u32 element type, u64 count, then the elements' encodings.
Bytes array_value(ValueType elem, uint64_t count, const Bytes& elems) {
  Bytes b;
  b.put<uint32_t>(static_cast<uint32_t>(elem)).put<uint64_t>(count).append(elems);
  return b;
}

template <typename T>
Bytes scalar_array(ValueType elem, const std::vector<T>& v) {
  Bytes e;
  for (T x : v) e.put<T>(x);
  return array_value(elem, v.size(), e);
}

Bytes string_array(const std::vector<std::string>& v) {
  Bytes e;
  for (const std::string& s : v) e.str(s);
  return array_value(ValueType::kString, v.size(), e);
}

class GgufBuilder {
 public:
  explicit GgufBuilder(uint32_t version = 3) : version_(version) {}

  // `value` is the encoded value that follows the type field.
  GgufBuilder& kv(std::string_view key, ValueType type, const Bytes& value) {
    kvs_.str(key).put<uint32_t>(static_cast<uint32_t>(type)).append(value);
    ++n_kv_;
    return *this;
  }
  template <typename T>
  GgufBuilder& scalar(std::string_view key, ValueType type, T v) {
    Bytes b;
    b.put<T>(v);
    return kv(key, type, b);
  }
  GgufBuilder& u32(std::string_view key, uint32_t v) { return scalar(key, ValueType::kUint32, v); }
  GgufBuilder& f32(std::string_view key, float v) { return scalar(key, ValueType::kFloat32, v); }
  GgufBuilder& str(std::string_view key, std::string_view v) {
    Bytes b;
    b.str(v);
    return kv(key, ValueType::kString, b);
  }
  GgufBuilder& alignment(uint32_t a) {
    alignment_ = a;
    return u32("general.alignment", a);
  }

  // `type_id` is a raw ggml type id; `data` the tensor bytes; `offset` overrides the packed offset.
  GgufBuilder& tensor(std::string name, std::vector<uint64_t> dims, uint32_t type_id, std::vector<uint8_t> data,
                      std::optional<uint64_t> offset = std::nullopt) {
    tensors_.push_back(Tensor{std::move(name), std::move(dims), type_id, std::move(data), offset});
    return *this;
  }
  GgufBuilder& tensor(std::string name, std::vector<uint64_t> dims, GgmlType type, std::vector<uint8_t> data) {
    return tensor(std::move(name), std::move(dims), static_cast<uint32_t>(type), std::move(data));
  }

  std::vector<uint8_t> build() const {
    Bytes out;
    out.put<uint32_t>(0x46554747).put<uint32_t>(version_).put<uint64_t>(tensors_.size()).put<uint64_t>(n_kv_);
    out.append(kvs_);
    // Tensor data is packed in order, each start aligned; no padding after the last one, so every
    // byte of the file is needed.
    std::vector<uint64_t> offsets;
    uint64_t next = 0;
    for (const Tensor& t : tensors_) {
      next = (next + alignment_ - 1) / alignment_ * alignment_;
      offsets.push_back(t.offset.value_or(next));
      next += t.data.size();
    }
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Tensor& t = tensors_[i];
      out.str(t.name).put<uint32_t>(static_cast<uint32_t>(t.dims.size()));
      for (uint64_t d : t.dims) out.put<uint64_t>(d);
      out.put<uint32_t>(t.type_id).put<uint64_t>(offsets[i]);
    }
    if (tensors_.empty()) return out.data;
    while (out.data.size() % alignment_ != 0) out.data.push_back(0);
    const size_t data_start = out.data.size();
    next = 0;
    for (const Tensor& t : tensors_) {
      next = (next + alignment_ - 1) / alignment_ * alignment_;
      out.data.resize(data_start + next, 0);
      out.data.insert(out.data.end(), t.data.begin(), t.data.end());
      next += t.data.size();
    }
    return out.data;
  }

 private:
  struct Tensor {
    std::string name;
    std::vector<uint64_t> dims;
    uint32_t type_id;
    std::vector<uint8_t> data;
    std::optional<uint64_t> offset;
  };
  uint32_t version_;
  uint32_t alignment_ = 32;
  uint64_t n_kv_ = 0;
  Bytes kvs_;
  std::vector<Tensor> tensors_;
};

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + i * 7);
  return b;
}

// Parses a copy of exactly `size` bytes so that AddressSanitizer would flag any over-read.
Result<std::unique_ptr<GgufFile>> parse(const std::vector<uint8_t>& bytes, size_t size) {
  auto copy = std::make_unique<std::vector<uint8_t>>(bytes.begin(), bytes.begin() + size);
  Result<std::unique_ptr<GgufFile>> r = GgufFile::from_memory(copy->data(), copy->size());
  // A parsed file views its buffer, so successful parses keep theirs until the test binary exits.
  static std::vector<std::unique_ptr<std::vector<uint8_t>>> keep_alive;
  if (r.ok()) keep_alive.push_back(std::move(copy));
  return r;
}
Result<std::unique_ptr<GgufFile>> parse(const std::vector<uint8_t>& bytes) { return parse(bytes, bytes.size()); }

// Asserts kDataLoss whose message names the byte offset and contains `what`.
void expect_data_loss(const std::vector<uint8_t>& bytes, std::string_view what) {
  Result<std::unique_ptr<GgufFile>> r = parse(bytes);
  ASSERT_FALSE(r.ok()) << "expected an error containing '" << what << "'";
  EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << r.status().to_string();
  EXPECT_NE(r.status().message().find("byte"), std::string::npos) << r.status().message();
  EXPECT_NE(r.status().message().find(what), std::string::npos) << r.status().message();
}

// A small valid file with every value type, nested arrays and three tensors.
GgufBuilder full_builder(uint32_t version, uint32_t alignment) {
  GgufBuilder b(version);
  if (alignment != 32) b.alignment(alignment);
  b.scalar<uint8_t>("t.u8", ValueType::kUint8, 200)
      .scalar<int8_t>("t.i8", ValueType::kInt8, -100)
      .scalar<uint16_t>("t.u16", ValueType::kUint16, 60000)
      .scalar<int16_t>("t.i16", ValueType::kInt16, -30000)
      .u32("t.u32", 4000000000u)
      .scalar<int32_t>("t.i32", ValueType::kInt32, -2000000000)
      .f32("t.f32", 0.25f)
      .scalar<uint8_t>("t.bool", ValueType::kBool, 1)
      .str("t.string", "h\xC3\xA9llo")
      .str("t.empty", "")
      .scalar<uint64_t>("t.u64", ValueType::kUint64, 18000000000000000000ull)
      .scalar<int64_t>("t.i64", ValueType::kInt64, -9000000000000000000ll)
      .scalar<double>("t.f64", ValueType::kFloat64, 1e-300)
      .kv("t.arr_u8", ValueType::kArray, scalar_array<uint8_t>(ValueType::kUint8, {1, 2, 255}))
      .kv("t.arr_i16", ValueType::kArray, scalar_array<int16_t>(ValueType::kInt16, {-5, 7}))
      .kv("t.arr_u32", ValueType::kArray, scalar_array<uint32_t>(ValueType::kUint32, {10, 20, 30}))
      .kv("t.arr_i32", ValueType::kArray, scalar_array<int32_t>(ValueType::kInt32, {-1, 0, 1}))
      .kv("t.arr_f32", ValueType::kArray, scalar_array<float>(ValueType::kFloat32, {1.5f, -2.0f}))
      .kv("t.arr_f64", ValueType::kArray, scalar_array<double>(ValueType::kFloat64, {0.125}))
      .kv("t.arr_bool", ValueType::kArray, scalar_array<uint8_t>(ValueType::kBool, {0, 1}))
      .kv("t.arr_i64", ValueType::kArray, scalar_array<int64_t>(ValueType::kInt64, {-3, 1ll << 40}))
      .kv("t.arr_str", ValueType::kArray, string_array({"a", "", "tokens"}))
      .kv("t.arr_empty", ValueType::kArray, array_value(ValueType::kInt32, 0, Bytes{}));
  // array<array<int32>> = [[1, 2], [3]] and array<array<string>> = [["x"], []].
  Bytes nested_int;
  nested_int.append(scalar_array<int32_t>(ValueType::kInt32, {1, 2})).append(scalar_array<int32_t>(ValueType::kInt32, {3}));
  b.kv("t.nested", ValueType::kArray, array_value(ValueType::kArray, 2, nested_int));
  Bytes nested_str;
  nested_str.append(string_array({"x"})).append(string_array({}));
  b.kv("t.nested_str", ValueType::kArray, array_value(ValueType::kArray, 2, nested_str));
  // array<array<array<uint8>>> = [[[9]]]
  Bytes inner = array_value(ValueType::kArray, 1, scalar_array<uint8_t>(ValueType::kUint8, {9}));
  b.kv("t.nested3", ValueType::kArray, array_value(ValueType::kArray, 1, inner));

  b.tensor("a.weight", {4, 3}, GgmlType::F32, f32_bytes({0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11}));
  b.tensor("b.weight", {64, 2}, GgmlType::Q4_0, pattern(4 * 18, 3));  // 4 blocks of 32
  b.tensor("c.bias", {5}, GgmlType::F16, pattern(10, 9));
  return b;
}

// ---------------------------------------------------------------------------------------------
// Parsing valid files

void check_full_file(const GgufFile& f, uint32_t version, uint32_t alignment) {
  EXPECT_EQ(f.version(), version);
  EXPECT_EQ(f.alignment(), alignment);

  EXPECT_EQ(*f.get_u32("t.u8"), 200u);
  EXPECT_EQ(*f.get_i64("t.i8"), -100);
  EXPECT_EQ(*f.get_u32("t.u16"), 60000u);
  EXPECT_EQ(*f.get_i64("t.i16"), -30000);
  EXPECT_EQ(*f.get_u32("t.u32"), 4000000000u);
  EXPECT_EQ(*f.get_i64("t.i32"), -2000000000);
  EXPECT_EQ(*f.get_f32("t.f32"), 0.25f);
  EXPECT_TRUE(*f.get_bool("t.bool"));
  EXPECT_EQ(*f.get_string("t.string"), "h\xC3\xA9llo");
  EXPECT_EQ(*f.get_string("t.empty"), "");
  EXPECT_EQ(f.find("t.u64")->as_u64(), 18000000000000000000ull);
  EXPECT_EQ(*f.get_i64("t.i64"), -9000000000000000000ll);
  EXPECT_EQ(f.find("t.f64")->as_f64(), 1e-300);
  EXPECT_EQ(f.find("t.f64")->type(), ValueType::kFloat64);

  EXPECT_EQ(*f.get_i32_array("t.arr_u8"), (std::vector<int32_t>{1, 2, 255}));
  EXPECT_EQ(*f.get_i32_array("t.arr_i16"), (std::vector<int32_t>{-5, 7}));
  EXPECT_EQ(*f.get_i32_array("t.arr_u32"), (std::vector<int32_t>{10, 20, 30}));
  EXPECT_EQ(*f.get_i32_array("t.arr_i32"), (std::vector<int32_t>{-1, 0, 1}));
  EXPECT_EQ(*f.get_f32_array("t.arr_f32"), (std::vector<float>{1.5f, -2.0f}));
  EXPECT_EQ(*f.get_f32_array("t.arr_f64"), (std::vector<float>{0.125f}));
  const Value* bools = f.find("t.arr_bool");
  ASSERT_NE(bools, nullptr);
  EXPECT_EQ(bools->type_string(), "array<bool>");
  EXPECT_EQ(bools->at(0).as_bool(), false);
  EXPECT_EQ(bools->at(1).as_bool(), true);
  EXPECT_EQ(f.find("t.arr_i64")->at(1).as_i64(), 1ll << 40);
  EXPECT_EQ(*f.get_string_array("t.arr_str"), (std::vector<std::string>{"a", "", "tokens"}));
  EXPECT_TRUE(f.get_i32_array("t.arr_empty")->empty());

  const Value* nested = f.find("t.nested");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->type_string(), "array<array<int32>>");
  ASSERT_EQ(nested->size(), 2u);
  EXPECT_EQ(nested->at(0).size(), 2u);
  EXPECT_EQ(nested->at(0).at(1).as_i64(), 2);
  EXPECT_EQ(nested->at(1).at(0).as_i64(), 3);
  const Value* nested_str = f.find("t.nested_str");
  ASSERT_NE(nested_str, nullptr);
  EXPECT_EQ(nested_str->at(0).at(0).as_string(), "x");
  EXPECT_EQ(nested_str->at(1).size(), 0u);
  EXPECT_EQ(f.find("t.nested3")->at(0).at(0).at(0).as_u64(), 9u);

  // Metadata keeps file order.
  ASSERT_FALSE(f.metadata().empty());
  EXPECT_EQ(f.metadata().front().key, alignment != 32 ? "general.alignment" : "t.u8");
  EXPECT_EQ(f.find("no.such.key"), nullptr);

  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.data_offset() % alignment, 0u);
  const TensorInfo* a = f.find_tensor("a.weight");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dims, (std::vector<int64_t>{4, 3}));
  EXPECT_EQ(a->type, GgmlType::F32);
  EXPECT_EQ(a->offset, 0u);
  EXPECT_EQ(a->n_elements, 12);
  EXPECT_EQ(a->n_bytes, 48u);
  float a_values[12];
  std::memcpy(a_values, a->data, sizeof a_values);
  EXPECT_EQ(a_values[11], 11.0f);
  const TensorInfo* b = f.find_tensor("b.weight");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->type, GgmlType::Q4_0);
  EXPECT_EQ(b->n_elements, 128);
  EXPECT_EQ(b->n_bytes, 72u);
  EXPECT_EQ(b->offset % alignment, 0u);
  EXPECT_EQ(std::vector<uint8_t>(b->data, b->data + b->n_bytes), pattern(72, 3));
  const TensorInfo* c = f.find_tensor("c.bias");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->n_bytes, 10u);
  EXPECT_EQ(f.data_offset() + c->offset + c->n_bytes, f.file_size());  // the last tensor ends the file
  EXPECT_EQ(f.find_tensor("missing"), nullptr);
}

TEST(Gguf, ParsesEveryValueTypeV3) {
  const std::vector<uint8_t> bytes = full_builder(3, 32).build();
  auto r = parse(bytes);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  check_full_file(**r, 3, 32);
}

TEST(Gguf, ParsesEveryValueTypeV2) {
  const std::vector<uint8_t> bytes = full_builder(2, 32).build();
  auto r = parse(bytes);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  check_full_file(**r, 2, 32);
}

TEST(Gguf, HonoursGeneralAlignment) {
  for (uint32_t alignment : {1u, 8u, 64u, 4096u}) {
    SCOPED_TRACE(alignment);
    const std::vector<uint8_t> bytes = full_builder(3, alignment).build();
    auto r = parse(bytes);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    check_full_file(**r, 3, alignment);
  }
}

TEST(Gguf, EmptyFileWithoutTensors) {
  auto r = parse(GgufBuilder(3).build());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_TRUE((*r)->tensors().empty());
  EXPECT_TRUE((*r)->metadata().empty());
}

TEST(Gguf, DequantizesParsedTensor) {
  auto r = parse(full_builder(3, 32).build());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const TensorInfo* t = (*r)->find_tensor("a.weight");
  std::vector<float> out(t->n_elements);
  ASSERT_TRUE(dequantize(t->type, t->data, t->n_bytes, out.data(), t->n_elements).ok());
  EXPECT_EQ(out[5], 5.0f);
}

// ---------------------------------------------------------------------------------------------
// Typed getters

TEST(Gguf, GettersConvertIntegersThatFitAndNameMismatches) {
  GgufBuilder b;
  b.scalar<int32_t>("neg", ValueType::kInt32, -1)
      .scalar<int32_t>("pos_i32", ValueType::kInt32, 7)
      .scalar<uint64_t>("big", ValueType::kUint64, 1ull << 40)
      .scalar<uint64_t>("huge", ValueType::kUint64, ~0ull)
      .scalar<uint8_t>("small", ValueType::kUint8, 3)
      .u32("count", 30)
      .str("name", "llama")
      .kv("ints", ValueType::kArray, scalar_array<int64_t>(ValueType::kInt64, {1, 1ll << 33}))
      .kv("strs", ValueType::kArray, string_array({"a"}));
  auto r = parse(b.build());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const GgufFile& f = **r;

  EXPECT_EQ(*f.get_u32("pos_i32"), 7u);
  EXPECT_EQ(*f.get_u32("small"), 3u);
  EXPECT_EQ(*f.get_i64("big"), 1ll << 40);
  EXPECT_EQ(*f.get_f32("count"), 30.0f);

  auto expect_error = [](const Status& st, StatusCode code, std::vector<std::string> parts) {
    EXPECT_EQ(st.code(), code) << st.to_string();
    for (const std::string& p : parts) EXPECT_NE(st.message().find(p), std::string::npos) << st.message();
  };
  expect_error(f.get_u32("neg").status(), StatusCode::kDataLoss, {"'neg'", "int32", "uint32"});
  expect_error(f.get_u32("big").status(), StatusCode::kDataLoss, {"'big'", "uint64"});
  expect_error(f.get_i64("huge").status(), StatusCode::kDataLoss, {"'huge'", "int64"});
  expect_error(f.get_string("count").status(), StatusCode::kDataLoss, {"'count'", "uint32", "string"});
  expect_error(f.get_u32("name").status(), StatusCode::kDataLoss, {"'name'", "string"});
  expect_error(f.get_bool("count").status(), StatusCode::kDataLoss, {"'count'", "bool"});
  expect_error(f.get_f32("name").status(), StatusCode::kDataLoss, {"'name'", "string"});
  expect_error(f.get_u32("absent").status(), StatusCode::kNotFound, {"'absent'"});
  expect_error(f.get_i32_array("ints").status(), StatusCode::kDataLoss, {"'ints'", "element 1", "int32"});
  expect_error(f.get_i32_array("strs").status(), StatusCode::kDataLoss, {"'strs'", "array<string>"});
  expect_error(f.get_string_array("ints").status(), StatusCode::kDataLoss, {"'ints'", "array<int64>"});
  expect_error(f.get_f32_array("count").status(), StatusCode::kDataLoss, {"'count'", "uint32"});

  EXPECT_EQ(*f.get_u32_or("absent", 5), 5u);
  EXPECT_EQ(*f.get_u32_or("count", 5), 30u);
  EXPECT_EQ(*f.get_f32_or("absent", 1e-5f), 1e-5f);
  EXPECT_EQ(*f.get_string_or("absent", "x"), "x");
  EXPECT_FALSE(f.get_u32_or("name", 5).ok());  // present with the wrong type is still an error
}

// ---------------------------------------------------------------------------------------------
// Malformed input: kDataLoss naming the problem and its byte offset.

std::vector<uint8_t> minimal_with_tensor() {
  GgufBuilder b;
  b.u32("k", 1).tensor("t", {8}, GgmlType::F32, f32_bytes(std::vector<float>(8, 1.0f)));
  return b.build();
}

void patch_u64(std::vector<uint8_t>& bytes, size_t at, uint64_t v) { std::memcpy(bytes.data() + at, &v, 8); }
void patch_u32(std::vector<uint8_t>& bytes, size_t at, uint32_t v) { std::memcpy(bytes.data() + at, &v, 4); }

TEST(Gguf, RejectsBadHeader) {
  std::vector<uint8_t> bytes = minimal_with_tensor();
  std::vector<uint8_t> bad = bytes;
  bad[0] = 'X';
  expect_data_loss(bad, "bad magic");

  bad = bytes;
  patch_u32(bad, 4, 1);
  expect_data_loss(bad, "version 1");
  bad = bytes;
  patch_u32(bad, 4, 4);
  expect_data_loss(bad, "version 4");
  bad = bytes;
  patch_u32(bad, 4, 0x03000000);  // version 3 written big-endian
  expect_data_loss(bad, "big-endian");

  expect_data_loss(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 3), "magic");
  expect_data_loss(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 12), "tensor count");
}

TEST(Gguf, RejectsAbsurdCounts) {
  std::vector<uint8_t> bad = minimal_with_tensor();
  patch_u64(bad, 8, 1ull << 60);  // tensor count
  expect_data_loss(bad, "tensor count 1152921504606846976 at byte 8");
  bad = minimal_with_tensor();
  patch_u64(bad, 16, 1ull << 60);  // metadata count
  expect_data_loss(bad, "metadata count 1152921504606846976 at byte 16");
  bad = minimal_with_tensor();
  patch_u64(bad, 16, 1000);  // 1000 entries of >= 13 bytes cannot fit a ~100-byte file
  expect_data_loss(bad, "metadata count 1000 at byte 16 is more than the remaining");
}

TEST(Gguf, RejectsStringLengthBeyondFile) {
  std::vector<uint8_t> bad = minimal_with_tensor();
  patch_u64(bad, 24, ~0ull);  // length of the first key
  expect_data_loss(bad, "string length 18446744073709551615 at byte 24 exceeds the file");
  // Just one byte too long.
  bad = minimal_with_tensor();
  patch_u64(bad, 24, bad.size() - 32 + 1);
  expect_data_loss(bad, "at byte 24 exceeds the file");
}

TEST(Gguf, RejectsBadValues) {
  expect_data_loss(GgufBuilder().scalar<uint32_t>("k", static_cast<ValueType>(13), 0).build(), "unknown value type 13");
  expect_data_loss(GgufBuilder().kv("k", ValueType::kArray, array_value(static_cast<ValueType>(99), 0, Bytes{})).build(),
                   "unknown array element type 99");
  expect_data_loss(GgufBuilder().kv("k", ValueType::kArray, array_value(ValueType::kUint32, 1ull << 60, Bytes{})).build(),
                   "array length of key 'k' 1152921504606846976");
  // Array of strings whose count fits 8-byte minimum per element but whose strings do not.
  Bytes two_strings;
  two_strings.str("abc").put<uint64_t>(1000);
  expect_data_loss(GgufBuilder().kv("k", ValueType::kArray, array_value(ValueType::kString, 2, two_strings)).build(),
                   "element 1 of key 'k': string length 1000");
  // Truncated scalar.
  Bytes two;
  two.put<uint16_t>(1);
  expect_data_loss(GgufBuilder().kv("k", ValueType::kUint32, two).build(), "uint32 value of key 'k'");
  expect_data_loss(GgufBuilder().u32("dup", 1).u32("dup", 2).build(), "duplicate metadata key 'dup'");

  // Arrays nested 9 deep.
  Bytes v = scalar_array<uint8_t>(ValueType::kUint8, {1});
  for (int i = 0; i < 9; ++i) v = array_value(ValueType::kArray, 1, v);
  expect_data_loss(GgufBuilder().kv("deep", ValueType::kArray, v).build(), "nested deeper");
  // 8 deep is fine.
  Bytes ok = scalar_array<uint8_t>(ValueType::kUint8, {1});
  for (int i = 0; i < 7; ++i) ok = array_value(ValueType::kArray, 1, ok);
  EXPECT_TRUE(parse(GgufBuilder().kv("deep", ValueType::kArray, ok).build()).ok());
}

TEST(Gguf, RejectsBadAlignment) {
  GgufBuilder b;
  b.u32("general.alignment", 48);
  expect_data_loss(b.build(), "general.alignment 48");
  expect_data_loss(GgufBuilder().u32("general.alignment", 0).build(), "general.alignment 0");
  expect_data_loss(GgufBuilder().str("general.alignment", "32").build(), "general.alignment at byte");
}

TEST(Gguf, RejectsBadTensorInfos) {
  const auto f32 = [](size_t n) { return f32_bytes(std::vector<float>(n, 0.5f)); };
  expect_data_loss(GgufBuilder().tensor("t", {1, 1, 1, 1, 1}, GgmlType::F32, f32(1)).build(), "n_dims 5");
  expect_data_loss(GgufBuilder().tensor("t", {1ull << 32, 1ull << 32}, GgmlType::F32, {}).build(), "overflows");
  expect_data_loss(GgufBuilder().tensor("t", {1ull << 63}, GgmlType::F32, {}).build(), "out of range");
  // 2^61 elements of F32 is 2^63 bytes: the count fits int64, the bytes do not fit the file.
  expect_data_loss(GgufBuilder().tensor("t", {1ull << 61}, GgmlType::F32, {}).build(), "past the end");
  expect_data_loss(GgufBuilder().tensor("t", {8}, 4u, f32(8)).build(), "unknown ggml type 4");
  expect_data_loss(GgufBuilder().tensor("t", {8}, 1000u, f32(8)).build(), "unknown ggml type 1000");
  expect_data_loss(GgufBuilder().tensor("t", {33}, GgmlType::Q4_0, pattern(18, 0)).build(),
                   "dims[0] = 33");
  expect_data_loss(GgufBuilder().tensor("t", {8}, GgmlType::F32, f32(8)).tensor("t", {8}, GgmlType::F32, f32(8)).build(),
                   "duplicate tensor 't'");
  expect_data_loss(GgufBuilder().tensor("t", {8}, static_cast<uint32_t>(GgmlType::F32), f32(8), 4).build(),
                   "offset 4 is not a multiple of the alignment 32");
  expect_data_loss(GgufBuilder().tensor("t", {8}, static_cast<uint32_t>(GgmlType::F32), f32(8), 1ull << 62).build(),
                   "past the end of the file");
  // Data one element short of the file end.
  expect_data_loss(GgufBuilder().tensor("t", {8}, GgmlType::F32, f32(7)).build(), "past the end of the file");
  // Second tensor placed on top of the first.
  expect_data_loss(GgufBuilder()
                       .tensor("a", {16}, static_cast<uint32_t>(GgmlType::F32), f32(16), 0)
                       .tensor("b", {8}, static_cast<uint32_t>(GgmlType::F32), f32(8), 32)
                       .build(),
                   "overlaps tensor 'b'");
  // Name length beyond the file.
  std::vector<uint8_t> bad = GgufBuilder().tensor("t", {8}, GgmlType::F32, f32(8)).build();
  patch_u64(bad, 24, 1ull << 40);
  expect_data_loss(bad, "name of tensor 0: string length 1099511627776 at byte 24");
}

// Every proper prefix of a valid file is an error (the last tensor ends the file), never a crash.
TEST(Gguf, EveryTruncationFails) {
  const std::vector<uint8_t> bytes = full_builder(3, 32).build();
  ASSERT_TRUE(parse(bytes).ok());
  for (size_t n = 0; n < bytes.size(); ++n) {
    Result<std::unique_ptr<GgufFile>> r = parse(bytes, n);
    ASSERT_FALSE(r.ok()) << "prefix of " << n << " bytes parsed";
    ASSERT_EQ(r.status().code(), StatusCode::kDataLoss) << n << ": " << r.status().to_string();
    ASSERT_NE(r.status().message().find("byte"), std::string::npos) << n << ": " << r.status().message();
  }
}

// Flipping any single byte must give either a valid file or an error, never a crash.
TEST(Gguf, SingleByteCorruptionNeverCrashes) {
  const std::vector<uint8_t> bytes = full_builder(3, 32).build();
  for (size_t i = 0; i < bytes.size(); ++i) {
    for (uint8_t x : {0x00, 0xFF, 0x80}) {
      std::vector<uint8_t> bad = bytes;
      bad[i] ^= x == 0 ? bad[i] : x;
      Result<std::unique_ptr<GgufFile>> r = parse(bad);
      if (!r.ok()) {
        ASSERT_NE(r.status().message().find("byte"), std::string::npos) << r.status().message();
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Files on disk

std::string write_temp(const std::vector<uint8_t>& bytes, const std::string& tag) {
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("starserve_test_gguf_" + tag + "_" + std::to_string(::getpid()) + ".gguf"))
                               .string();
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return path;
}

TEST(Gguf, OpensFromDisk) {
  const std::string path = write_temp(full_builder(3, 64).build(), "ok");
  auto r = GgufFile::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  check_full_file(**r, 3, 64);
  EXPECT_EQ((*r)->path(), path);
  std::remove(path.c_str());

  EXPECT_EQ(GgufFile::open("/nonexistent/model.gguf").status().code(), StatusCode::kNotFound);

  const std::string empty = write_temp({}, "empty");
  EXPECT_EQ(GgufFile::open(empty).status().code(), StatusCode::kDataLoss);
  std::remove(empty.c_str());

  std::vector<uint8_t> bad = full_builder(3, 32).build();
  bad.resize(bad.size() - 1);
  const std::string truncated = write_temp(bad, "trunc");
  Status st = GgufFile::open(truncated).status();
  EXPECT_EQ(st.code(), StatusCode::kDataLoss);
  EXPECT_NE(st.message().find(truncated), std::string::npos) << st.message();  // names the file
  std::remove(truncated.c_str());
}

// ---------------------------------------------------------------------------------------------
// GgufWeightSource

GgufBuilder llama_builder() {
  GgufBuilder b;
  b.str("general.architecture", "llama")
      .str("general.name", "tiny")
      .u32("llama.block_count", 2)
      .u32("llama.context_length", 256)
      .u32("llama.embedding_length", 64)
      .u32("llama.feed_forward_length", 96)
      .u32("llama.attention.head_count", 4)
      .f32("llama.attention.layer_norm_rms_epsilon", 1e-6f)
      .kv("tokenizer.ggml.tokens", ValueType::kArray, string_array({"a", "b", "c"}));
  return b;
}

Result<std::unique_ptr<GgufWeightSource>> source_from(const std::vector<uint8_t>& bytes) {
  SS_ASSIGN_OR_RETURN(std::unique_ptr<GgufFile> f, parse(bytes));
  return GgufWeightSource::from_file(std::move(f));
}

TEST(Gguf, SourceReadsLlamaHParamsWithDefaults) {
  GgufBuilder b = llama_builder();
  std::vector<float> w(64 * 3);
  for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>(i);
  b.tensor("token_embd.weight", {64, 3}, GgmlType::F32, f32_bytes(w));
  auto r = source_from(b.build());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const ModelHParams& hp = (*r)->hparams();
  EXPECT_EQ(hp.arch, "llama");
  EXPECT_EQ(hp.arch_name, "llama");
  EXPECT_EQ(hp.name, "tiny");
  EXPECT_EQ(hp.n_layers, 2);
  EXPECT_EQ(hp.hidden, 64);
  EXPECT_EQ(hp.ffn_hidden, 96);
  EXPECT_EQ(hp.n_heads, 4);
  EXPECT_EQ(hp.n_kv_heads, 4);   // default: head_count
  EXPECT_EQ(hp.head_dim, 16);    // default: hidden / heads
  EXPECT_EQ(hp.rope_dim, 16);    // default: head_dim
  EXPECT_EQ(hp.rope_theta, 10000.0f);
  EXPECT_EQ(hp.rms_eps, 1e-6f);
  EXPECT_EQ(hp.max_context, 256);
  EXPECT_EQ(hp.n_vocab, 3);      // from tokenizer.ggml.tokens
  EXPECT_EQ(hp.rope_style, RopeStyle::kInterleaved);
  EXPECT_EQ(hp.rope_scaling.type, RopeScaling::Type::kNone);
  EXPECT_TRUE(hp.tied_embeddings);

  EXPECT_TRUE((*r)->has("token_embd.weight"));
  EXPECT_FALSE((*r)->has("output.weight"));
  Result<HostTensor> t = (*r)->load("token_embd.weight");
  ASSERT_TRUE(t.ok()) << t.status().to_string();
  EXPECT_EQ(t->shape, (std::vector<int64_t>{3, 64}));  // ggml [64, 3] reversed
  EXPECT_EQ(t->data[64 * 2 + 5], 133.0f);              // row 2, column 5
  Status missing = (*r)->load("output.weight").status();
  EXPECT_EQ(missing.code(), StatusCode::kNotFound);
  EXPECT_NE(missing.message().find("output.weight"), std::string::npos);
  EXPECT_NE((*r)->describe().find("gguf v3"), std::string::npos) << (*r)->describe();
  EXPECT_EQ((*r)->file().tensors().size(), 1u);
}

TEST(Gguf, SourceReadsExplicitHParams) {
  GgufBuilder b = llama_builder();
  b.u32("llama.attention.head_count_kv", 2)
      .u32("llama.rope.dimension_count", 8)
      .f32("llama.rope.freq_base", 500000.0f)
      .u32("llama.vocab_size", 5)
      .str("llama.rope.scaling.type", "linear")
      .f32("llama.rope.scaling.factor", 4.0f)
      .tensor("output.weight", {64, 5}, GgmlType::F16, pattern(64 * 5 * 2, 0));
  auto r = source_from(b.build());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const ModelHParams& hp = (*r)->hparams();
  EXPECT_EQ(hp.n_kv_heads, 2);
  EXPECT_EQ(hp.rope_dim, 8);
  EXPECT_EQ(hp.rope_theta, 500000.0f);
  EXPECT_EQ(hp.n_vocab, 5);
  EXPECT_EQ(hp.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(hp.rope_scaling.factor, 4.0f);
  EXPECT_FALSE(hp.tied_embeddings);
}

TEST(Gguf, SourceRejectsInconsistentHParams) {
  auto code_of = [](GgufBuilder b) { return source_from(b.build()).status(); };
  auto expect = [](const Status& st, StatusCode code, std::string_view part) {
    EXPECT_EQ(st.code(), code) << st.to_string();
    EXPECT_NE(st.message().find(part), std::string::npos) << st.message();
  };
  GgufBuilder b;
  b.str("general.architecture", "falcon");
  expect(code_of(b), StatusCode::kUnimplemented, "falcon");
  expect(code_of(llama_builder().u32("llama.attention.head_count_kv", 3)), StatusCode::kDataLoss, "n_kv_heads 3");
  expect(code_of(llama_builder().u32("llama.attention.key_length", 32)), StatusCode::kDataLoss, "64 != 4 * 32");
  expect(code_of(llama_builder().str("llama.rope.scaling.type", "yarn")), StatusCode::kUnimplemented, "yarn");
  expect(code_of(llama_builder().u32("llama.vocab_size", 0)), StatusCode::kDataLoss, "llama.vocab_size = 0");
  expect(code_of(llama_builder().f32("llama.rope.freq_base", -1.0f)), StatusCode::kDataLoss, "freq_base");
  expect(code_of(llama_builder().str("llama.block_count", "two")), StatusCode::kDataLoss, "llama.block_count");

  GgufBuilder no_layers;
  no_layers.str("general.architecture", "llama");
  expect(code_of(no_layers), StatusCode::kNotFound, "llama.block_count");
  // token_embd must be [hidden, n_vocab].
  expect(code_of(llama_builder().tensor("token_embd.weight", {64, 4}, GgmlType::F32, f32_bytes(std::vector<float>(256)))),
         StatusCode::kDataLoss, "token_embd.weight");
}

TEST(Gguf, SourceLoadRejectsTypesWithoutDequantizer) {
  GgufBuilder b = llama_builder();
  b.tensor("blk.0.ffn_up.weight", {256, 1}, GgmlType::Q2_K, pattern(84, 1));
  auto r = source_from(b.build());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  Status st = (*r)->load("blk.0.ffn_up.weight").status();
  EXPECT_EQ(st.code(), StatusCode::kUnimplemented);
  EXPECT_NE(st.message().find("Q2_K"), std::string::npos) << st.message();
}

// ---------------------------------------------------------------------------------------------
// The real model file (downloaded by scripts/test.sh).

TEST(Gguf, RealModelSmolLM2) {
  const std::string path = STARSERVE_DEFAULT_MODEL;
  ASSERT_TRUE(std::filesystem::exists(path))
      << "model file " << path << " is missing: run scripts/test.sh, which downloads it before the tests";
  auto r = GgufWeightSource::open(path);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const GgufWeightSource& src = **r;
  const GgufFile& f = src.file();
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.tensors().size(), 272u);
  EXPECT_EQ(*f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens")->size(), 49152u);
  EXPECT_EQ(f.get_i32_array("tokenizer.ggml.token_type")->size(), 49152u);

  const ModelHParams& hp = src.hparams();
  EXPECT_EQ(hp.n_layers, 30);
  EXPECT_EQ(hp.hidden, 576);
  EXPECT_EQ(hp.n_heads, 9);
  EXPECT_EQ(hp.n_kv_heads, 3);
  EXPECT_EQ(hp.head_dim, 64);
  EXPECT_EQ(hp.ffn_hidden, 1536);
  EXPECT_EQ(hp.n_vocab, 49152);
  EXPECT_EQ(hp.max_context, 8192);
  EXPECT_EQ(hp.rope_theta, 100000.0f);
  EXPECT_TRUE(hp.tied_embeddings);
  EXPECT_NE(src.describe().find("Q4_1"), std::string::npos) << src.describe();

  Result<HostTensor> k = src.load("blk.0.attn_k.weight");
  ASSERT_TRUE(k.ok()) << k.status().to_string();
  EXPECT_EQ(k->shape, (std::vector<int64_t>{192, 576}));
  // Expected values, flat (row-major) index -> value, computed once with gguf-py 0.19.0:
  //   r = gguf.GGUFReader(path); t = <tensor named blk.0.attn_k.weight>
  //   x = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
  // Q4_1 dequantization is exact fp32 math, so the values must match bit for bit.
  EXPECT_EQ(k->data[0], -0.1552734375f);
  EXPECT_EQ(k->data[1], 0.3402099609375f);
  EXPECT_EQ(k->data[577], 0.056640625f);
  EXPECT_EQ(k->data[50000], -0.1171875f);
  EXPECT_EQ(k->data[110591], 0.3636474609375f);
}

}  // namespace
}  // namespace starserve::gguf
