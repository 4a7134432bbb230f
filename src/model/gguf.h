// GGUF reader: metadata, tensor infos and the memory-mapped tensor data of a llama.cpp model file.
//
// File layout (little-endian, versions 2 and 3; v3 only added big-endian files, which we reject):
//   "GGUF" u32 version, u64 n_tensors, u64 n_kv
//   n_kv   x { string key, u32 value_type, value }
//   n_tensors x { string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset }
//   padding to general.alignment (default 32), then the tensor data section; offsets are relative
//   to its start and are multiples of the alignment.
//   string = u64 length + bytes (no terminator); array = u32 element type, u64 count, elements.
//
// Every count, length and offset is checked against the bytes that remain before anything is
// allocated from it; malformed input gives kDataLoss with the byte offset of the bad field.
// Strings, numeric arrays and tensor data are views into the mapping (no copies), so they live as
// long as the GgufFile.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace starserve::gguf {

// ggml tensor types with their official numeric ids (ggml.h `enum ggml_type`). The enumerators keep
// ggml's spelling so they can be grepped against llama.cpp. Ids 4, 5, 31-33 and 36-38 were removed
// from ggml and are rejected as unknown.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
  NVFP4 = 40,
  Q1_0 = 41,
};

// Storage of one ggml type: elements are stored in blocks of block_size elements taking type_size
// bytes (F32: 1 element, 4 bytes; Q4_K: 256 elements, 144 bytes).
struct GgmlTypeTraits {
  std::string_view name;  // "Q4_K"
  int64_t block_size = 0;
  int64_t type_size = 0;
};

// nullptr when `id` is not a ggml type this reader knows.
const GgmlTypeTraits* ggml_type_traits(uint32_t id);
inline const GgmlTypeTraits* ggml_type_traits(GgmlType type) { return ggml_type_traits(static_cast<uint32_t>(type)); }
// "Q4_K"; "type 77" for an unknown id.
std::string ggml_type_name(GgmlType type);
// 1 for unknown types, so callers that did not validate the type cannot divide by zero.
int64_t ggml_block_size(GgmlType type);
int64_t ggml_type_size(GgmlType type);

// GGUF metadata value types (gguf_type in gguf.h).
enum class ValueType : uint32_t {
  kUint8 = 0,
  kInt8 = 1,
  kUint16 = 2,
  kInt16 = 3,
  kUint32 = 4,
  kInt32 = 5,
  kFloat32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kUint64 = 10,
  kInt64 = 11,
  kFloat64 = 12,
};
// "uint32", "string", ...; "type 13" for an unknown id.
std::string value_type_name(ValueType type);

class Parser;  // gguf.cpp

// One metadata value. Scalars are held by value; strings and numeric arrays point into the file's
// bytes; arrays of strings keep one view per element and arrays of arrays keep their elements.
class Value {
 public:
  ValueType type() const { return type_; }
  // Byte offset of the value's encoding in the file (for error messages).
  uint64_t file_offset() const { return file_offset_; }
  bool is_integer() const;
  bool is_float() const { return type_ == ValueType::kFloat32 || type_ == ValueType::kFloat64; }

  // Scalar accessors: nullopt when the value is of another kind or does not fit.
  std::optional<int64_t> as_i64() const;    // any integer type whose value fits int64
  std::optional<uint64_t> as_u64() const;   // any integer type whose value is >= 0
  std::optional<double> as_f64() const;     // float32/float64 exactly, integers converted
  std::optional<bool> as_bool() const;      // bool only
  std::optional<std::string_view> as_string() const;

  // Arrays (size() is 0 for scalars).
  ValueType elem_type() const { return elem_type_; }
  uint64_t size() const { return n_items_; }
  // Element i < size(). Scalars and strings are built on the fly (cheap); an element that is itself
  // an array is copied, which for a string array copies its views.
  Value at(uint64_t i) const;

  // "uint32", "array<string>", "array<array<int32>>".
  std::string type_string() const;
  // Short text for logs and dumps: 30, 1e-05, "llama", [49152 x string].
  std::string summary() const;

 private:
  friend class Parser;
  ValueType type_ = ValueType::kUint8;
  uint64_t file_offset_ = 0;
  uint64_t bits_ = 0;           // scalar: its little-endian bytes, zero-extended to 64 bits
  std::string_view str_;        // kString
  ValueType elem_type_ = ValueType::kUint8;  // kArray
  uint64_t n_items_ = 0;                     // kArray
  const uint8_t* raw_ = nullptr;             // kArray of numbers/bools: n_items_ packed elements
  std::vector<std::string_view> strings_;    // kArray of strings
  std::vector<Value> items_;                 // kArray of arrays
};

struct KeyValue {
  std::string_view key;  // into the file
  Value value;
};

struct TensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ggml order: dims[0] varies fastest (a linear layer is [in, out])
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;        // bytes from the start of the data section
  int64_t n_elements = 0;
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // into the mapping; n_bytes long, valid while the GgufFile lives
};

class GgufFile {
 public:
  // Maps `path` read-only and parses it. kNotFound when the file does not exist, kDataLoss when it
  // is malformed (the message names the field and its byte offset, then the path).
  static Result<std::unique_ptr<GgufFile>> open(const std::string& path);
  // Parses size bytes at `data` in place; the buffer must outlive the returned file.
  static Result<std::unique_ptr<GgufFile>> from_memory(const uint8_t* data, size_t size);

  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // byte where the tensor data section starts
  uint64_t file_size() const { return size_; }
  const std::string& path() const { return path_; }  // empty for from_memory

  // Metadata in file order, and lookup by key.
  const std::vector<KeyValue>& metadata() const { return kvs_; }
  const Value* find(std::string_view key) const;

  // Typed getters. kNotFound when the key is absent; kDataLoss naming the key and the actual type
  // when the value is of the wrong kind or does not fit. Integer getters accept any integer type
  // whose value fits (llama.cpp writes some counts as uint32, others as int32 or uint64); get_f32
  // accepts float32, float64 and integers.
  Result<uint32_t> get_u32(std::string_view key) const;
  Result<int64_t> get_i64(std::string_view key) const;
  Result<float> get_f32(std::string_view key) const;
  Result<bool> get_bool(std::string_view key) const;
  Result<std::string> get_string(std::string_view key) const;
  Result<std::vector<std::string>> get_string_array(std::string_view key) const;
  Result<std::vector<int32_t>> get_i32_array(std::string_view key) const;
  Result<std::vector<float>> get_f32_array(std::string_view key) const;

  // As above, but an absent key gives `fallback` (a present key of the wrong type is still an error).
  Result<uint32_t> get_u32_or(std::string_view key, uint32_t fallback) const;
  Result<int64_t> get_i64_or(std::string_view key, int64_t fallback) const;
  Result<float> get_f32_or(std::string_view key, float fallback) const;
  Result<bool> get_bool_or(std::string_view key, bool fallback) const;
  Result<std::string> get_string_or(std::string_view key, std::string_view fallback) const;

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(std::string_view name) const;

 private:
  friend class Parser;
  GgufFile() = default;
  Result<const Value*> require(std::string_view key) const;

  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* map_ = nullptr;  // owned mmap region (open) or nullptr (from_memory)
  std::string path_;
  uint32_t version_ = 0;
  uint32_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<KeyValue> kvs_;
  std::unordered_map<std::string_view, size_t> kv_index_;      // keys view the file
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string_view, size_t> tensor_index_;  // keys view the file
};

}  // namespace starserve::gguf
