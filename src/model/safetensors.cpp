#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <sstream>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "model/dequant.h"

// Header fields and tensor data are little-endian; they are read with memcpy into host types.
static_assert(std::endian::native == std::endian::little, "the safetensors reader assumes a little-endian host");

namespace starserve::safetensors {
namespace {

using nlohmann::json;

struct DtypeEntry {
  Dtype dtype;
  std::string_view name;
  int64_t size;
};
constexpr std::array kDtypes = {
    DtypeEntry{Dtype::kBool, "BOOL", 1},     DtypeEntry{Dtype::kU8, "U8", 1},
    DtypeEntry{Dtype::kI8, "I8", 1},         DtypeEntry{Dtype::kF8E5M2, "F8_E5M2", 1},
    DtypeEntry{Dtype::kF8E4M3, "F8_E4M3", 1}, DtypeEntry{Dtype::kI16, "I16", 2},
    DtypeEntry{Dtype::kU16, "U16", 2},       DtypeEntry{Dtype::kF16, "F16", 2},
    DtypeEntry{Dtype::kBF16, "BF16", 2},     DtypeEntry{Dtype::kI32, "I32", 4},
    DtypeEntry{Dtype::kU32, "U32", 4},       DtypeEntry{Dtype::kF32, "F32", 4},
    DtypeEntry{Dtype::kF64, "F64", 8},       DtypeEntry{Dtype::kI64, "I64", 8},
    DtypeEntry{Dtype::kU64, "U64", 8},
};

const DtypeEntry* find_dtype(std::string_view name) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.name == name) return &e;
  }
  return nullptr;
}

// Names and keys come from the file: cap their length in messages.
std::string shown(std::string_view s) {
  constexpr size_t kMaxShown = 80;
  if (s.size() <= kMaxShown) return fmt::format("'{}'", s);
  return fmt::format("'{}...' ({} bytes)", s.substr(0, kMaxShown), s.size());
}

std::string json_kind(const json& v) { return v.type_name(); }

// A non-negative JSON integer, or nullopt (negative, fractional, not a number, or beyond uint64).
std::optional<uint64_t> as_u64(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer() && v.get<int64_t>() >= 0) return static_cast<uint64_t>(v.get<int64_t>());
  return std::nullopt;
}

Result<std::string> read_text_file(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return not_found("{} does not exist", path);
  std::ifstream in(path, std::ios::binary);
  if (!in) return internal_error("cannot open {}", path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// Parses JSON text, reporting the byte offset of the first error. `base_offset` is added to the
// offset (the safetensors header starts at byte 8 of its file).
Result<json> parse_json(std::string_view text, uint64_t base_offset, std::string_view what) {
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    // e.byte is 1-based and points one past the offending character.
    const uint64_t at = base_offset + (e.byte > 0 ? e.byte - 1 : 0);
    return data_loss("{} is not valid JSON: parse error at byte {}", what, at);
  }
}

}  // namespace

std::string_view dtype_name(Dtype dtype) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

int64_t dtype_size(Dtype dtype) {
  for (const DtypeEntry& e : kDtypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, size_);
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return not_found("safetensors: {} does not exist", path);
    return internal_error("safetensors: cannot open {}: {}", path, std::strerror(err));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return internal_error("safetensors: cannot stat {}: {}", path, std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return invalid_argument("safetensors: {} is not a regular file", path);
  }
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->size_ = static_cast<uint64_t>(st.st_size);
  f->path_ = path;
  // mmap of 0 bytes fails; an empty file is reported by parse() like any other short file.
  if (f->size_ > 0) {
    void* map = mmap(nullptr, f->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    if (map == MAP_FAILED) {
      ::close(fd);
      return internal_error("safetensors: cannot mmap {} ({} bytes): {}", path, f->size_, std::strerror(err));
    }
    f->map_ = map;
    f->base_ = static_cast<const uint8_t*>(map);
  }
  ::close(fd);  // the mapping keeps the file alive
  Status s = f->parse();
  if (!s.ok()) return Status(s.code(), fmt::format("{} (in {})", s.message(), path));
  return f;
}

Result<std::unique_ptr<SafetensorsFile>> SafetensorsFile::from_memory(const uint8_t* data, size_t size) {
  std::unique_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->base_ = data;
  f->size_ = size;
  SS_RETURN_IF_ERROR(f->parse());
  return f;
}

Status SafetensorsFile::parse() {
  if (size_ < 8) {
    return data_loss("safetensors: file is {} bytes, too short for the 8-byte header length at byte 0", size_);
  }
  uint64_t header_len = 0;
  std::memcpy(&header_len, base_, 8);
  if (header_len > kMaxHeaderBytes) {
    return data_loss("safetensors: header length {} (u64 at byte 0) exceeds the format's limit of {} bytes",
                     header_len, kMaxHeaderBytes);
  }
  if (header_len > size_ - 8) {
    return data_loss("safetensors: header length {} (u64 at byte 0) extends beyond the file: only {} bytes follow",
                     header_len, size_ - 8);
  }
  data_offset_ = 8 + header_len;
  const uint64_t data_size = size_ - data_offset_;
  const std::string_view text(reinterpret_cast<const char*>(base_ + 8), header_len);
  SS_ASSIGN_OR_RETURN(json header, parse_json(text, 8, fmt::format("safetensors: header (bytes 8..{})", data_offset_)));
  if (!header.is_object()) {
    return data_loss("safetensors: header at byte 8 is a JSON {}, expected an object", json_kind(header));
  }

  tensors_.reserve(header.size());
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return data_loss("safetensors: __metadata__ is a JSON {}, expected an object", json_kind(entry));
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return data_loss("safetensors: __metadata__ key {} is a JSON {}, expected a string", shown(m.key()),
                           json_kind(m.value()));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string q = shown(name);
    if (!entry.is_object()) return data_loss("safetensors: tensor {} is a JSON {}, expected an object", q, json_kind(entry));

    TensorInfo t;
    t.name = name;
    auto dt = entry.find("dtype");
    if (dt == entry.end() || !dt->is_string()) return data_loss("safetensors: tensor {} has no string \"dtype\"", q);
    const DtypeEntry* d = find_dtype(dt->get<std::string>());
    if (d == nullptr) {
      return unimplemented("safetensors: tensor {} has dtype {}, which this reader does not know", q,
                           shown(dt->get<std::string>()));
    }
    t.dtype = d->dtype;

    auto shape = entry.find("shape");
    if (shape == entry.end() || !shape->is_array()) return data_loss("safetensors: tensor {} has no \"shape\" array", q);
    if (shape->size() > kMaxRank) {
      return data_loss("safetensors: tensor {} has rank {}, more than the {} this reader accepts", q, shape->size(),
                       kMaxRank);
    }
    int64_t numel = 1;
    for (const json& dim : *shape) {
      std::optional<uint64_t> v = as_u64(dim);
      if (!v || *v > static_cast<uint64_t>(kMaxDim)) {
        return data_loss("safetensors: tensor {} has shape {}: each dimension must be an integer in [0, 2^40]", q,
                         dim.dump());
      }
      t.shape.push_back(static_cast<int64_t>(*v));
      // Dimensions are <= 2^40, so overflow is possible only in the product.
      if (__builtin_mul_overflow(numel, static_cast<int64_t>(*v), &numel)) {
        return data_loss("safetensors: tensor {} has shape {} whose element count overflows int64", q, shape->dump());
      }
    }
    t.numel = numel;
    int64_t n_bytes = 0;
    if (__builtin_mul_overflow(numel, d->size, &n_bytes)) {
      return data_loss("safetensors: tensor {} has shape {} whose byte size overflows int64", q, shape->dump());
    }
    t.n_bytes = static_cast<uint64_t>(n_bytes);

    auto offs = entry.find("data_offsets");
    if (offs == entry.end() || !offs->is_array() || offs->size() != 2) {
      return data_loss("safetensors: tensor {} has no \"data_offsets\" [begin, end] pair", q);
    }
    std::optional<uint64_t> begin = as_u64((*offs)[0]), end = as_u64((*offs)[1]);
    if (!begin || !end) {
      return data_loss("safetensors: tensor {} has data_offsets {}: expected two non-negative integers", q,
                       offs->dump());
    }
    if (*begin > *end || *end > data_size) {
      return data_loss("safetensors: tensor {} has data_offsets [{}, {}] outside the data section of {} bytes "
                       "(file bytes {}..{})",
                       q, *begin, *end, data_size, data_offset_, size_);
    }
    if (*end - *begin != t.n_bytes) {
      return data_loss("safetensors: tensor {} has data_offsets [{}, {}] ({} bytes) but shape [{}] x {} needs {} bytes",
                       q, *begin, *end, *end - *begin, fmt::join(t.shape, ", "), d->name, t.n_bytes);
    }
    t.begin = *begin;
    t.data = base_ + data_offset_ + t.begin;
    tensors_.push_back(std::move(t));
  }

  // The format requires the tensors to tile the data section exactly: no overlap (two tensors
  // aliasing bytes), no holes and no trailing bytes (room for a second, hidden payload).
  std::sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.n_bytes < b.n_bytes;
  });
  uint64_t expected = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : tensors_) {
    if (t.begin < expected) {
      return data_loss("safetensors: tensor {} (data bytes {}..{}) overlaps tensor {} (data bytes {}..{})",
                       shown(t.name), t.begin, t.begin + t.n_bytes, shown(prev->name), prev->begin,
                       prev->begin + prev->n_bytes);
    }
    if (t.begin > expected) {
      return data_loss("safetensors: data bytes {}..{} (file byte {}) before tensor {} belong to no tensor", expected,
                       t.begin, data_offset_ + expected, shown(t.name));
    }
    expected = t.begin + t.n_bytes;
    prev = &t;
  }
  if (expected != data_size) {
    return data_loss("safetensors: data section has {} bytes but its tensors cover only {} (trailing bytes from file "
                     "byte {})",
                     data_size, expected, data_offset_ + expected);
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
  return Status();
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// ---------------------------------------------------------------------------------------------
// Conversion

Status to_f32(const TensorInfo& t, float* dst) {
  const uint8_t* src = t.data;
  switch (t.dtype) {
    case Dtype::kF32:
      if (t.numel > 0) std::memcpy(dst, src, static_cast<size_t>(t.numel) * sizeof(float));
      return Status();
    case Dtype::kF16:
      for (int64_t i = 0; i < t.numel; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = gguf::fp16_to_fp32(h);
      }
      return Status();
    case Dtype::kBF16:
      for (int64_t i = 0; i < t.numel; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        dst[i] = gguf::bf16_to_fp32(h);
      }
      return Status();
    default:
      return unimplemented("safetensors: tensor {} has dtype {}; only F32, F16 and BF16 convert to fp32",
                           shown(t.name), dtype_name(t.dtype));
  }
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints

Result<ShardIndex> parse_shard_index(std::string_view json_text, std::string_view origin) {
  SS_ASSIGN_OR_RETURN(json doc, parse_json(json_text, 0, origin));
  if (!doc.is_object()) return data_loss("{} is a JSON {}, expected an object", origin, json_kind(doc));
  auto wm = doc.find("weight_map");
  if (wm == doc.end() || !wm->is_object()) return data_loss("{} has no \"weight_map\" object", origin);
  if (wm->empty()) return data_loss("{} has an empty \"weight_map\"", origin);
  ShardIndex index;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it.value().is_string()) {
      return data_loss("{}: weight_map entry {} is a JSON {}, expected a file name", origin, shown(it.key()),
                       json_kind(it.value()));
    }
    const std::string file = it.value().get<std::string>();
    if (file.empty() || file.find('/') != std::string::npos || file.find('\\') != std::string::npos ||
        file.find("..") != std::string::npos) {
      return data_loss("{}: weight_map entry {} names file {}, expected a plain file name in the same directory",
                       origin, shown(it.key()), shown(file));
    }
    index.weight_map.emplace(it.key(), file);
    index.files.push_back(file);
  }
  std::sort(index.files.begin(), index.files.end());
  index.files.erase(std::unique(index.files.begin(), index.files.end()), index.files.end());
  return index;
}

Result<ShardIndex> read_shard_index(const std::string& path) {
  SS_ASSIGN_OR_RETURN(std::string text, read_text_file(path));
  return parse_shard_index(text, path);
}

Result<std::unique_ptr<Checkpoint>> Checkpoint::open_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path index_path = fs::path(dir) / "model.safetensors.index.json";
  const fs::path single_path = fs::path(dir) / "model.safetensors";
  std::error_code ec;
  std::unique_ptr<Checkpoint> ckpt(new Checkpoint());
  if (fs::exists(index_path, ec)) {
    SS_ASSIGN_OR_RETURN(ShardIndex index, read_shard_index(index_path.string()));
    std::map<std::string, const SafetensorsFile*> by_name;
    for (const std::string& file : index.files) {
      const fs::path p = fs::path(dir) / file;
      if (!fs::exists(p, ec)) return not_found("safetensors: shard {} listed in {} does not exist", p.string(), index_path.string());
      SS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::open(p.string()));
      by_name[file] = f.get();
      ckpt->files_.push_back(std::move(f));
    }
    for (const auto& [name, file] : index.weight_map) {
      const TensorInfo* t = by_name.at(file)->find(name);
      if (t == nullptr) {
        return data_loss("safetensors: {} maps tensor {} to {}, which does not contain it", index_path.string(),
                         shown(name), file);
      }
      ckpt->tensors_.emplace(name, t);
    }
    ckpt->sharded_ = true;
    return ckpt;
  }
  if (!fs::exists(single_path, ec)) {
    return not_found("safetensors: {} has neither model.safetensors.index.json nor model.safetensors", dir);
  }
  SS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::open(single_path.string()));
  for (const TensorInfo& t : f->tensors()) ckpt->tensors_.emplace(t.name, &t);
  ckpt->files_.push_back(std::move(f));
  return ckpt;
}

const TensorInfo* Checkpoint::find(std::string_view name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : it->second;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& [name, t] : tensors_) out.push_back(name);
  return out;
}

}  // namespace starserve::safetensors
