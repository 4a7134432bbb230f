#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <new>

#include "common/check.h"

// Fields are read with memcpy into host integers, which is the file's byte order only on
// little-endian hosts.
static_assert(std::endian::native == std::endian::little, "the GGUF reader assumes a little-endian host");

namespace starserve::gguf {
namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kDefaultAlignment = 32;
constexpr uint32_t kMaxDims = 4;
// Arrays of arrays are legal but never deeper than 2 in practice; the limit bounds the recursion
// (each level costs only 12 bytes of input, so without it a 1 MB file could overflow the stack).
constexpr int kMaxArrayDepth = 8;
// Counts are already bounded by the bytes left, but a parsed entry takes several times the bytes
// of its smallest encoding; reserving only up to this many lets a file that claims many entries
// and then ends early fail before it has cost memory.
constexpr uint64_t kMaxReserve = 1 << 16;

// Smallest encoding of one element of each value type: numbers their size, a string its u64
// length, an array its u32 type + u64 count. Used to bound counts by the bytes that remain.
constexpr uint64_t min_encoded_size(ValueType t) {
  switch (t) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kBool: return 1;
    case ValueType::kUint16:
    case ValueType::kInt16: return 2;
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kFloat32: return 4;
    case ValueType::kUint64:
    case ValueType::kInt64:
    case ValueType::kFloat64:
    case ValueType::kString: return 8;
    case ValueType::kArray: return 12;
  }
  return 0;
}

bool is_known_value_type(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::kFloat64); }

bool is_scalar(ValueType t) { return t != ValueType::kString && t != ValueType::kArray; }

// Block sizes and bytes per block, from ggml's type traits (ggml.c) / GGML_QUANT_SIZES in gguf-py.
constexpr int64_t kQkK = 256;  // K-quant super-block
struct TypeEntry {
  uint32_t id;
  GgmlTypeTraits traits;
};
constexpr std::array kTypeTable = {
    TypeEntry{0, {"F32", 1, 4}},
    TypeEntry{1, {"F16", 1, 2}},
    TypeEntry{2, {"Q4_0", 32, 2 + 16}},
    TypeEntry{3, {"Q4_1", 32, 2 + 2 + 16}},
    TypeEntry{6, {"Q5_0", 32, 2 + 4 + 16}},
    TypeEntry{7, {"Q5_1", 32, 2 + 2 + 4 + 16}},
    TypeEntry{8, {"Q8_0", 32, 2 + 32}},
    TypeEntry{9, {"Q8_1", 32, 4 + 4 + 32}},
    TypeEntry{10, {"Q2_K", kQkK, 2 + 2 + kQkK / 16 + kQkK / 4}},
    TypeEntry{11, {"Q3_K", kQkK, 2 + kQkK / 4 + kQkK / 8 + 12}},
    TypeEntry{12, {"Q4_K", kQkK, 2 + 2 + kQkK / 2 + 12}},
    TypeEntry{13, {"Q5_K", kQkK, 2 + 2 + kQkK / 2 + kQkK / 8 + 12}},
    TypeEntry{14, {"Q6_K", kQkK, 2 + kQkK / 2 + kQkK / 4 + kQkK / 16}},
    TypeEntry{15, {"Q8_K", kQkK, 4 + kQkK + kQkK / 8}},
    TypeEntry{16, {"IQ2_XXS", kQkK, 2 + kQkK / 4}},
    TypeEntry{17, {"IQ2_XS", kQkK, 2 + kQkK / 4 + kQkK / 32}},
    TypeEntry{18, {"IQ3_XXS", kQkK, 2 + kQkK / 4 + kQkK / 8}},
    TypeEntry{19, {"IQ1_S", kQkK, 2 + kQkK / 8 + kQkK / 16}},
    TypeEntry{20, {"IQ4_NL", 32, 2 + 16}},
    TypeEntry{21, {"IQ3_S", kQkK, 2 + kQkK / 4 + kQkK / 8 + kQkK / 32 + 4}},
    TypeEntry{22, {"IQ2_S", kQkK, 2 + kQkK / 4 + kQkK / 16}},
    TypeEntry{23, {"IQ4_XS", kQkK, 2 + 2 + kQkK / 2 + kQkK / 64}},
    TypeEntry{24, {"I8", 1, 1}},
    TypeEntry{25, {"I16", 1, 2}},
    TypeEntry{26, {"I32", 1, 4}},
    TypeEntry{27, {"I64", 1, 8}},
    TypeEntry{28, {"F64", 1, 8}},
    TypeEntry{29, {"IQ1_M", kQkK, kQkK / 8 + kQkK / 16 + kQkK / 32}},
    TypeEntry{30, {"BF16", 1, 2}},
    TypeEntry{34, {"TQ1_0", kQkK, 2 + 4 * 13}},
    TypeEntry{35, {"TQ2_0", kQkK, 2 + 64}},
    TypeEntry{39, {"MXFP4", 32, 1 + 16}},
    TypeEntry{40, {"NVFP4", 64, 4 + 32}},
    TypeEntry{41, {"Q1_0", 128, 2 + 16}},
};

// Keys and names come from the file: in messages, cap their length and show bytes outside
// printable ASCII as \xNN so that a corrupt name cannot garble a log line.
std::string quoted(std::string_view s) {
  constexpr size_t kMaxShown = 80;
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7F) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  out += "'";
  if (s.size() > kMaxShown) out += fmt::format(" (first {} of {} bytes)", kMaxShown, s.size());
  return out;
}

}  // namespace

const GgmlTypeTraits* ggml_type_traits(uint32_t id) {
  for (const TypeEntry& e : kTypeTable) {
    if (e.id == id) return &e.traits;
  }
  return nullptr;
}

std::string ggml_type_name(GgmlType type) {
  const GgmlTypeTraits* t = ggml_type_traits(type);
  return t ? std::string(t->name) : fmt::format("type {}", static_cast<uint32_t>(type));
}

int64_t ggml_block_size(GgmlType type) {
  const GgmlTypeTraits* t = ggml_type_traits(type);
  return t ? t->block_size : 1;
}

int64_t ggml_type_size(GgmlType type) {
  const GgmlTypeTraits* t = ggml_type_traits(type);
  return t ? t->type_size : 1;
}

std::string value_type_name(ValueType type) {
  switch (type) {
    case ValueType::kUint8: return "uint8";
    case ValueType::kInt8: return "int8";
    case ValueType::kUint16: return "uint16";
    case ValueType::kInt16: return "int16";
    case ValueType::kUint32: return "uint32";
    case ValueType::kInt32: return "int32";
    case ValueType::kFloat32: return "float32";
    case ValueType::kBool: return "bool";
    case ValueType::kString: return "string";
    case ValueType::kArray: return "array";
    case ValueType::kUint64: return "uint64";
    case ValueType::kInt64: return "int64";
    case ValueType::kFloat64: return "float64";
  }
  return fmt::format("type {}", static_cast<uint32_t>(type));
}

// ---------------------------------------------------------------------------------------------
// Value

bool Value::is_integer() const {
  switch (type_) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kUint16:
    case ValueType::kInt16:
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kUint64:
    case ValueType::kInt64: return true;
    default: return false;
  }
}

std::optional<int64_t> Value::as_i64() const {
  switch (type_) {
    case ValueType::kUint8:
    case ValueType::kUint16:
    case ValueType::kUint32: return static_cast<int64_t>(bits_);
    case ValueType::kInt8: return static_cast<int8_t>(bits_);
    case ValueType::kInt16: return static_cast<int16_t>(bits_);
    case ValueType::kInt32: return static_cast<int32_t>(bits_);
    case ValueType::kInt64: return static_cast<int64_t>(bits_);
    case ValueType::kUint64:
      if (bits_ > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return std::nullopt;
      return static_cast<int64_t>(bits_);
    default: return std::nullopt;
  }
}

std::optional<uint64_t> Value::as_u64() const {
  if (type_ == ValueType::kUint64) return bits_;
  std::optional<int64_t> v = as_i64();
  if (!v || *v < 0) return std::nullopt;
  return static_cast<uint64_t>(*v);
}

std::optional<double> Value::as_f64() const {
  if (type_ == ValueType::kFloat32) return std::bit_cast<float>(static_cast<uint32_t>(bits_));
  if (type_ == ValueType::kFloat64) return std::bit_cast<double>(bits_);
  if (type_ == ValueType::kUint64) return static_cast<double>(bits_);
  if (std::optional<int64_t> v = as_i64()) return static_cast<double>(*v);
  return std::nullopt;
}

std::optional<bool> Value::as_bool() const {
  if (type_ != ValueType::kBool) return std::nullopt;
  return bits_ != 0;
}

std::optional<std::string_view> Value::as_string() const {
  if (type_ != ValueType::kString) return std::nullopt;
  return str_;
}

Value Value::at(uint64_t i) const {
  SS_CHECK(type_ == ValueType::kArray && i < n_items_, "at({}) on {} of size {}", i, type_string(), n_items_);
  if (elem_type_ == ValueType::kArray) return items_[i];
  Value v;
  v.type_ = elem_type_;
  if (elem_type_ == ValueType::kString) {
    v.str_ = strings_[i];
    v.file_offset_ = file_offset_;
    return v;
  }
  const uint64_t size = min_encoded_size(elem_type_);
  // raw_ follows the u32 type and u64 count of the array header.
  v.file_offset_ = file_offset_ + 12 + i * size;
  std::memcpy(&v.bits_, raw_ + i * size, size);
  return v;
}

std::string Value::type_string() const {
  if (type_ != ValueType::kArray) return value_type_name(type_);
  if (elem_type_ == ValueType::kArray) {
    // Nested element types may differ per element; name the first one's.
    return n_items_ > 0 ? fmt::format("array<{}>", items_[0].type_string()) : "array<array>";
  }
  return fmt::format("array<{}>", value_type_name(elem_type_));
}

std::string Value::summary() const {
  switch (type_) {
    case ValueType::kString: return fmt::format("\"{}\"", str_.substr(0, 60));
    case ValueType::kBool: return bits_ ? "true" : "false";
    case ValueType::kFloat32:
    case ValueType::kFloat64: return fmt::format("{}", *as_f64());
    case ValueType::kArray: {
      const std::string t = type_string();  // "array<elem>"
      return fmt::format("[{} x {}]", n_items_, t.substr(6, t.size() - 7));
    }
    case ValueType::kUint64: return fmt::format("{}", bits_);
    default: return fmt::format("{}", as_i64().value_or(0));
  }
}

// ---------------------------------------------------------------------------------------------
// Parser: a cursor over the file's bytes that turns every short read into kDataLoss.

class Parser {
 public:
  explicit Parser(GgufFile& file) : f_(file), base_(file.base_), size_(file.size_) {}

  Status parse();

 private:
  uint64_t remaining() const { return size_ - pos_; }

  Status need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return data_loss("gguf: truncated: {} needs {} bytes at byte {} but the file ends at byte {}", what, n, pos_,
                       size_);
    }
    return Status();
  }

  template <typename T>
  Result<T> read(std::string_view what) {
    SS_RETURN_IF_ERROR(need(sizeof(T), what));
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  Result<std::string_view> read_string(std::string_view what) {
    const uint64_t at = pos_;
    SS_ASSIGN_OR_RETURN(uint64_t len, read<uint64_t>(what));
    if (len > remaining()) {
      return data_loss("gguf: {}: string length {} at byte {} exceeds the file ({} bytes)", what, len, at, size_);
    }
    std::string_view s(reinterpret_cast<const char*>(base_ + pos_), len);
    pos_ += len;
    return s;
  }

  // Reads a count that is followed by `count` items of at least `min_item_bytes` each.
  Result<uint64_t> read_count(std::string_view what, uint64_t min_item_bytes) {
    const uint64_t at = pos_;
    SS_ASSIGN_OR_RETURN(uint64_t n, read<uint64_t>(what));
    if (n > remaining() / min_item_bytes) {
      return data_loss("gguf: {} {} at byte {} is more than the remaining {} bytes of the file can hold", what, n, at,
                       remaining());
    }
    return n;
  }

  Result<Value> parse_value(ValueType type, std::string_view key, int depth);
  Status parse_metadata(uint64_t n_kv);
  Status parse_tensor_infos(uint64_t n_tensors, std::vector<uint64_t>& info_at);
  Status place_tensors(const std::vector<uint64_t>& info_at);

  GgufFile& f_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

Result<Value> Parser::parse_value(ValueType type, std::string_view key, int depth) {
  Value v;
  v.type_ = type;
  v.file_offset_ = pos_;
  if (is_scalar(type)) {
    const uint64_t n = min_encoded_size(type);
    SS_RETURN_IF_ERROR(need(n, fmt::format("{} value of key {}", value_type_name(type), quoted(key))));
    std::memcpy(&v.bits_, base_ + pos_, n);
    pos_ += n;
    return v;
  }
  if (type == ValueType::kString) {
    SS_ASSIGN_OR_RETURN(v.str_, read_string(fmt::format("value of key {}", quoted(key))));
    return v;
  }
  // Array.
  if (depth >= kMaxArrayDepth) {
    return data_loss("gguf: key {}: arrays nested deeper than {} levels at byte {}", quoted(key), kMaxArrayDepth, pos_);
  }
  const uint64_t type_at = pos_;
  SS_ASSIGN_OR_RETURN(uint32_t elem, read<uint32_t>(fmt::format("array element type of key {}", quoted(key))));
  if (!is_known_value_type(elem)) {
    return data_loss("gguf: key {}: unknown array element type {} at byte {}", quoted(key), elem, type_at);
  }
  v.elem_type_ = static_cast<ValueType>(elem);
  SS_ASSIGN_OR_RETURN(v.n_items_, read_count(fmt::format("array length of key {}", quoted(key)),
                                             min_encoded_size(v.elem_type_)));
  if (is_scalar(v.elem_type_)) {
    // n_items_ * size fits: read_count bounded n_items_ by remaining() / size.
    v.raw_ = base_ + pos_;
    pos_ += v.n_items_ * min_encoded_size(v.elem_type_);
  } else if (v.elem_type_ == ValueType::kString) {
    v.strings_.reserve(std::min(v.n_items_, kMaxReserve));
    for (uint64_t i = 0; i < v.n_items_; ++i) {
      SS_ASSIGN_OR_RETURN(std::string_view s, read_string(fmt::format("element {} of key {}", i, quoted(key))));
      v.strings_.push_back(s);
    }
  } else {
    v.items_.reserve(std::min(v.n_items_, kMaxReserve));
    for (uint64_t i = 0; i < v.n_items_; ++i) {
      SS_ASSIGN_OR_RETURN(Value item, parse_value(ValueType::kArray, key, depth + 1));
      v.items_.push_back(std::move(item));
    }
  }
  return v;
}

Status Parser::parse_metadata(uint64_t n_kv) {
  f_.kvs_.reserve(std::min(n_kv, kMaxReserve));
  for (uint64_t i = 0; i < n_kv; ++i) {
    const uint64_t at = pos_;
    SS_ASSIGN_OR_RETURN(std::string_view key, read_string(fmt::format("key of metadata entry {}", i)));
    if (f_.kv_index_.count(key)) {
      return data_loss("gguf: duplicate metadata key {} at byte {}", quoted(key), at);
    }
    const uint64_t type_at = pos_;
    SS_ASSIGN_OR_RETURN(uint32_t type, read<uint32_t>(fmt::format("value type of key {}", quoted(key))));
    if (!is_known_value_type(type)) {
      return data_loss("gguf: key {}: unknown value type {} at byte {}", quoted(key), type, type_at);
    }
    SS_ASSIGN_OR_RETURN(Value value, parse_value(static_cast<ValueType>(type), key, 0));
    f_.kv_index_.emplace(key, f_.kvs_.size());
    f_.kvs_.push_back(KeyValue{key, std::move(value)});
  }
  return Status();
}

Status Parser::parse_tensor_infos(uint64_t n_tensors, std::vector<uint64_t>& info_at) {
  f_.tensors_.reserve(std::min(n_tensors, kMaxReserve));
  info_at.reserve(std::min(n_tensors, kMaxReserve));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    const uint64_t at = pos_;
    SS_ASSIGN_OR_RETURN(std::string_view name, read_string(fmt::format("name of tensor {}", i)));
    const std::string what = fmt::format("tensor {}", quoted(name));
    // The index keys view the file's bytes, which stay put (TensorInfo::name may move).
    if (!f_.tensor_index_.emplace(name, f_.tensors_.size()).second) {
      return data_loss("gguf: duplicate {} at byte {}", what, at);
    }
    const uint64_t dims_at = pos_;
    SS_ASSIGN_OR_RETURN(uint32_t n_dims, read<uint32_t>(what + " n_dims"));
    if (n_dims > kMaxDims) {
      return data_loss("gguf: {} has n_dims {} at byte {} (at most {})", what, n_dims, dims_at, kMaxDims);
    }
    TensorInfo t;
    t.name = std::string(name);
    int64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t dim_at = pos_;
      SS_ASSIGN_OR_RETURN(uint64_t dim, read<uint64_t>(what + " dims"));
      if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return data_loss("gguf: {} dims[{}] = {} at byte {} is out of range", what, d, dim, dim_at);
      }
      t.dims.push_back(static_cast<int64_t>(dim));
      if (__builtin_mul_overflow(n_elements, static_cast<int64_t>(dim), &n_elements)) {
        return data_loss("gguf: {} dims at byte {}: the element count overflows int64", what, dims_at);
      }
    }
    t.n_elements = n_elements;
    const uint64_t type_at = pos_;
    SS_ASSIGN_OR_RETURN(uint32_t type, read<uint32_t>(what + " type"));
    const GgmlTypeTraits* traits = ggml_type_traits(type);
    if (traits == nullptr) return data_loss("gguf: {} has unknown ggml type {} at byte {}", what, type, type_at);
    t.type = static_cast<GgmlType>(type);
    // A 0-d tensor holds one element, like a ggml tensor whose ne[] are all 1.
    const int64_t ne0 = t.dims.empty() ? 1 : t.dims[0];
    if (ne0 % traits->block_size != 0) {
      return data_loss("gguf: {} ({}) dims[0] = {} at byte {} is not a multiple of the block size {}", what,
                       traits->name, ne0, dims_at + 4, traits->block_size);
    }
    const uint64_t n_blocks = static_cast<uint64_t>(n_elements / traits->block_size);
    if (__builtin_mul_overflow(n_blocks, static_cast<uint64_t>(traits->type_size), &t.n_bytes)) {
      return data_loss("gguf: {} dims at byte {}: the byte size overflows", what, dims_at);
    }
    SS_ASSIGN_OR_RETURN(t.offset, read<uint64_t>(what + " offset"));
    f_.tensors_.push_back(std::move(t));
    info_at.push_back(at);
  }
  return Status();
}

Status Parser::place_tensors(const std::vector<uint64_t>& info_at) {
  std::vector<TensorInfo>& ts = f_.tensors_;
  if (ts.empty()) return Status();
  const uint64_t start = f_.data_offset_;
  if (start > size_) {
    return data_loss("gguf: the tensor data section would start at byte {} (header end aligned to {}) past the end of "
                     "the file ({} bytes)",
                     start, f_.alignment_, size_);
  }
  const uint64_t data_size = size_ - start;
  for (size_t i = 0; i < ts.size(); ++i) {
    TensorInfo& t = ts[i];
    if (t.offset % f_.alignment_ != 0) {
      return data_loss("gguf: tensor {} (info at byte {}): offset {} is not a multiple of the alignment {}",
                       quoted(t.name), info_at[i], t.offset, f_.alignment_);
    }
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      return data_loss("gguf: tensor {} (info at byte {}): data at offset {} + {} bytes (file byte {}) extends past "
                       "the end of the file ({} bytes)",
                       quoted(t.name), info_at[i], t.offset, t.n_bytes, start + std::min(t.offset, data_size), size_);
    }
    t.data = base_ + start + t.offset;
  }
  // Overlap: sort by offset and compare neighbours.
  std::vector<size_t> order(ts.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ts[a].offset < ts[b].offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const TensorInfo& a = ts[order[k - 1]];
    const TensorInfo& b = ts[order[k]];
    if (a.offset + a.n_bytes > b.offset && a.n_bytes > 0 && b.n_bytes > 0) {
      return data_loss("gguf: tensor {} (bytes {}..{}) overlaps tensor {} (bytes {}..{}; info at byte {})",
                       quoted(a.name), start + a.offset, start + a.offset + a.n_bytes, quoted(b.name),
                       start + b.offset, start + b.offset + b.n_bytes, info_at[order[k]]);
    }
  }
  return Status();
}

Status Parser::parse() {
  SS_ASSIGN_OR_RETURN(uint32_t magic, read<uint32_t>("magic"));
  if (magic != kMagic) {
    return data_loss("gguf: bad magic 0x{:08x} at byte 0 (expected \"GGUF\", 0x{:08x}); not a GGUF file", magic,
                     kMagic);
  }
  SS_ASSIGN_OR_RETURN(uint32_t version, read<uint32_t>("version"));
  if (version == 1) {
    return data_loss("gguf: version 1 at byte 4 is not supported (only 2 and 3); v1 used 32-bit counts, re-convert "
                     "the model with a current llama.cpp");
  }
  if (version != 2 && version != 3) {
    if ((version & 0xffff) == 0 && (version >> 16) != 0) {
      return data_loss("gguf: version field at byte 4 reads 0x{:08x}: a big-endian GGUF, which is not supported",
                       version);
    }
    return data_loss("gguf: version {} at byte 4 is not supported (only 2 and 3)", version);
  }
  f_.version_ = version;
  // Smallest tensor info: u64 name length, u32 n_dims, u32 type, u64 offset. Smallest kv: u64 key
  // length, u32 type, one byte of value.
  SS_ASSIGN_OR_RETURN(uint64_t n_tensors, read_count("tensor count", 24));
  SS_ASSIGN_OR_RETURN(uint64_t n_kv, read_count("metadata count", 13));
  SS_RETURN_IF_ERROR(parse_metadata(n_kv));

  f_.alignment_ = kDefaultAlignment;
  if (const Value* a = f_.find("general.alignment")) {
    std::optional<uint64_t> v = a->as_u64();
    if (!v) {
      return data_loss("gguf: general.alignment at byte {} is {}, expected an unsigned integer", a->file_offset(),
                       a->type_string());
    }
    if (*v == 0 || !std::has_single_bit(*v) || *v > std::numeric_limits<uint32_t>::max()) {
      return data_loss("gguf: general.alignment {} at byte {} is not a power of two that fits uint32", *v,
                       a->file_offset());
    }
    f_.alignment_ = static_cast<uint32_t>(*v);
  }

  std::vector<uint64_t> info_at;
  SS_RETURN_IF_ERROR(parse_tensor_infos(n_tensors, info_at));
  // pos_ <= size_ < 2^63 and alignment <= 2^31, so this cannot overflow.
  f_.data_offset_ = (pos_ + f_.alignment_ - 1) / f_.alignment_ * f_.alignment_;
  SS_RETURN_IF_ERROR(place_tensors(info_at));
  return Status();
}

// ---------------------------------------------------------------------------------------------
// GgufFile

namespace {
// The parser allocates only what the file's bytes back, but a file of millions of tiny entries can
// still exhaust memory; that must come back as a Status, not an exception.
Status run_parser(GgufFile& f) {
  try {
    return Parser(f).parse();
  } catch (const std::bad_alloc&) {
    return resource_exhausted("gguf: out of memory while parsing the metadata of a {}-byte file", f.file_size());
  }
}
}  // namespace

GgufFile::~GgufFile() {
  if (map_ != nullptr) munmap(map_, size_);
}

Result<std::unique_ptr<GgufFile>> GgufFile::from_memory(const uint8_t* data, size_t size) {
  if (data == nullptr && size > 0) return invalid_argument("gguf: from_memory given a null buffer of {} bytes", size);
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->base_ = data;
  f->size_ = size;
  SS_RETURN_IF_ERROR(run_parser(*f));
  return f;
}

Result<std::unique_ptr<GgufFile>> GgufFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return not_found("gguf: {} does not exist", path);
    return internal_error("gguf: cannot open {}: {}", path, std::strerror(err));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return internal_error("gguf: cannot stat {}: {}", path, std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument("gguf: {} is not a regular file", path);
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return data_loss("gguf: {} is empty (0 bytes, expected the \"GGUF\" magic at byte 0)", path);
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) return internal_error("gguf: cannot mmap {} ({} bytes): {}", path, size, std::strerror(err));

  std::unique_ptr<GgufFile> f(new GgufFile());
  f->map_ = map;
  f->base_ = static_cast<const uint8_t*>(map);
  f->size_ = size;
  f->path_ = path;
  Status st_parse = run_parser(*f);
  if (!st_parse.ok()) return Status(st_parse.code(), fmt::format("{} (in {})", st_parse.message(), path));
  return f;
}

const Value* GgufFile::find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
}

const TensorInfo* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

Result<const Value*> GgufFile::require(std::string_view key) const {
  const Value* v = find(key);
  if (v == nullptr) return not_found("gguf: metadata key {} not found", quoted(key));
  return v;
}

namespace {

Status wrong_type(std::string_view key, const Value& v, std::string_view expected) {
  return data_loss("gguf: metadata key {} (at byte {}) is {}, expected {}", quoted(key), v.file_offset(),
                   v.type_string(), expected);
}

Result<int64_t> integer_in(std::string_view key, const Value& v, int64_t lo, int64_t hi, std::string_view expected) {
  if (!v.is_integer()) return wrong_type(key, v, expected);
  std::optional<int64_t> x = v.as_i64();
  if (!x || *x < lo || *x > hi) {
    return data_loss("gguf: metadata key {} (at byte {}) = {} ({}) does not fit {}", quoted(key), v.file_offset(),
                     v.summary(), v.type_string(), expected);
  }
  return *x;
}

}  // namespace

Result<uint32_t> GgufFile::get_u32(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  SS_ASSIGN_OR_RETURN(int64_t x, integer_in(key, *v, 0, std::numeric_limits<uint32_t>::max(), "uint32"));
  return static_cast<uint32_t>(x);
}

Result<int64_t> GgufFile::get_i64(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  return integer_in(key, *v, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), "int64");
}

Result<float> GgufFile::get_f32(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  std::optional<double> x = v->as_f64();
  if (!x) return wrong_type(key, *v, "a number");
  return static_cast<float>(*x);
}

Result<bool> GgufFile::get_bool(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  std::optional<bool> x = v->as_bool();
  if (!x) return wrong_type(key, *v, "bool");
  return *x;
}

Result<std::string> GgufFile::get_string(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  std::optional<std::string_view> x = v->as_string();
  if (!x) return wrong_type(key, *v, "string");
  return std::string(*x);
}

Result<std::vector<std::string>> GgufFile::get_string_array(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  if (v->type() != ValueType::kArray || v->elem_type() != ValueType::kString) {
    return wrong_type(key, *v, "array<string>");
  }
  std::vector<std::string> out;
  out.reserve(v->size());
  for (uint64_t i = 0; i < v->size(); ++i) out.emplace_back(*v->at(i).as_string());
  return out;
}

Result<std::vector<int32_t>> GgufFile::get_i32_array(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  if (v->type() != ValueType::kArray || !is_scalar(v->elem_type()) || v->elem_type() == ValueType::kBool ||
      v->elem_type() == ValueType::kFloat32 || v->elem_type() == ValueType::kFloat64) {
    return wrong_type(key, *v, "an array of integers");
  }
  std::vector<int32_t> out;
  out.reserve(v->size());
  for (uint64_t i = 0; i < v->size(); ++i) {
    const Value e = v->at(i);
    std::optional<int64_t> x = e.as_i64();
    if (!x || *x < std::numeric_limits<int32_t>::min() || *x > std::numeric_limits<int32_t>::max()) {
      return data_loss("gguf: metadata key {} element {} (at byte {}) = {} does not fit int32", quoted(key), i,
                       e.file_offset(), e.summary());
    }
    out.push_back(static_cast<int32_t>(*x));
  }
  return out;
}

Result<std::vector<float>> GgufFile::get_f32_array(std::string_view key) const {
  SS_ASSIGN_OR_RETURN(const Value* v, require(key));
  if (v->type() != ValueType::kArray || !is_scalar(v->elem_type()) || v->elem_type() == ValueType::kBool) {
    return wrong_type(key, *v, "an array of numbers");
  }
  std::vector<float> out;
  out.reserve(v->size());
  for (uint64_t i = 0; i < v->size(); ++i) out.push_back(static_cast<float>(*v->at(i).as_f64()));
  return out;
}

namespace {
template <typename T, typename Getter>
Result<T> or_fallback(const GgufFile& f, std::string_view key, T fallback, Getter get) {
  if (f.find(key) == nullptr) return fallback;
  return get();
}
}  // namespace

Result<uint32_t> GgufFile::get_u32_or(std::string_view key, uint32_t fallback) const {
  return or_fallback(*this, key, fallback, [&] { return get_u32(key); });
}
Result<int64_t> GgufFile::get_i64_or(std::string_view key, int64_t fallback) const {
  return or_fallback(*this, key, fallback, [&] { return get_i64(key); });
}
Result<float> GgufFile::get_f32_or(std::string_view key, float fallback) const {
  return or_fallback(*this, key, fallback, [&] { return get_f32(key); });
}
Result<bool> GgufFile::get_bool_or(std::string_view key, bool fallback) const {
  return or_fallback(*this, key, fallback, [&] { return get_bool(key); });
}
Result<std::string> GgufFile::get_string_or(std::string_view key, std::string_view fallback) const {
  return or_fallback(*this, key, std::string(fallback), [&] { return get_string(key); });
}

}  // namespace starserve::gguf
