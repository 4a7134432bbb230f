// Safetensors reader: the tensor table and the memory-mapped data of a Hugging Face `.safetensors`
// file, and the index of a sharded checkpoint (`model.safetensors.index.json`).
//
// File layout:
//   u64 N (little-endian)           length of the header in bytes
//   N bytes of UTF-8 JSON           { "<tensor>": {"dtype": "BF16", "shape": [out, in],
//                                                  "data_offsets": [begin, end]}, ...,
//                                     "__metadata__": {"<key>": "<string>", ...} (optional) }
//                                   possibly padded with trailing spaces
//   data section                    offsets are relative to its start (byte 8 + N); tensors are
//                                   row-major, little-endian, and together cover the whole section
//                                   without holes or overlaps.
//
// Everything is validated before any tensor is handed out: the header length against the file,
// the JSON, every dtype / shape / offset pair (end - begin must equal numel x element size), and
// the coverage of the data section. Malformed input gives kDataLoss naming the tensor or the byte
// offset; a dtype this reader does not know gives kUnimplemented naming the dtype and the tensor.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/status.h"

namespace starserve::safetensors {

// The dtypes of the safetensors format, spelled as in the header. Only kF32, kF16 and kBF16 can be
// converted to fp32 (to_f32); the others are still parsed so that a checkpoint carrying an integer
// buffer or fp8 tensor we never read remains loadable.
enum class Dtype {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64,
};

// "BF16", "F8_E4M3", ... as written in headers.
std::string_view dtype_name(Dtype dtype);
// Bytes per element.
int64_t dtype_size(Dtype dtype);

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::kF32;
  std::vector<int64_t> shape;     // row-major, outermost first; {} is a scalar (1 element)
  int64_t numel = 0;
  uint64_t begin = 0;             // bytes from the start of the data section
  uint64_t n_bytes = 0;           // numel * dtype_size(dtype)
  const uint8_t* data = nullptr;  // into the file's bytes; valid while the SafetensorsFile lives
};

// Limits that turn absurd headers into errors instead of huge allocations.
inline constexpr uint64_t kMaxHeaderBytes = 100ull << 20;  // the format's own limit (100 MB)
inline constexpr size_t kMaxRank = 8;
inline constexpr int64_t kMaxDim = int64_t{1} << 40;

class SafetensorsFile {
 public:
  // Maps `path` read-only and parses it. kNotFound when it does not exist, kDataLoss when it is
  // malformed (message names the tensor or byte offset, then the path).
  static Result<std::unique_ptr<SafetensorsFile>> open(const std::string& path);
  // Parses `size` bytes at `data` in place; the buffer must outlive the returned file.
  static Result<std::unique_ptr<SafetensorsFile>> from_memory(const uint8_t* data, size_t size);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }  // empty for from_memory
  uint64_t file_size() const { return size_; }
  uint64_t data_offset() const { return data_offset_; }  // 8 + header length

  // Tensors in ascending data offset.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;
  // The optional "__metadata__" object (string values only), e.g. {"format": "pt"}.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  Status parse();

  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* map_ = nullptr;  // owned mmap region (open) or nullptr (from_memory)
  std::string path_;
  uint64_t data_offset_ = 0;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// Converts the tensor's elements to fp32 into dst (t.numel floats). F32 is copied, F16 and BF16
// are widened exactly; other dtypes give kUnimplemented naming the dtype and the tensor.
Status to_f32(const TensorInfo& t, float* dst);

// `model.safetensors.index.json`: which shard file holds each tensor.
struct ShardIndex {
  std::map<std::string, std::string> weight_map;  // tensor name -> file name, relative to the index
  std::vector<std::string> files;                 // distinct file names, sorted
};

// Parses the index text; `origin` names it in messages. kDataLoss when it is not JSON, has no
// "weight_map" object, or a file name is not a plain file name (empty, absolute, or containing
// '/', '\' or "..", which would escape the checkpoint directory).
Result<ShardIndex> parse_shard_index(std::string_view json_text, std::string_view origin);
Result<ShardIndex> read_shard_index(const std::string& path);

// A whole checkpoint: one `model.safetensors`, or the shards listed by the index. Tensor names are
// the file's own (Hugging Face names); the index is authoritative for which shard holds a tensor.
class Checkpoint {
 public:
  // Opens dir/model.safetensors.index.json when present, else dir/model.safetensors. kNotFound when
  // neither exists or a listed shard is missing; kDataLoss when a tensor named by the index is not
  // in its shard.
  static Result<std::unique_ptr<Checkpoint>> open_dir(const std::string& dir);

  const TensorInfo* find(std::string_view name) const;
  // All tensor names, sorted.
  std::vector<std::string> names() const;
  size_t n_files() const { return files_.size(); }
  bool sharded() const { return sharded_; }

 private:
  Checkpoint() = default;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorInfo*, std::less<>> tensors_;  // points into files_
  bool sharded_ = false;
};

}  // namespace starserve::safetensors
