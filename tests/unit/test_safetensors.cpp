// Safetensors reader: valid files, every malformed-header case, truncations and byte corruption
// (must error, never crash), dtype conversion, the shard index and whole checkpoint directories.
// Files are built by a small writer below that only follows the documented layout.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/safetensors.h"

namespace starserve::safetensors {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Writer

struct Entry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

template <typename T>
std::vector<uint8_t> raw(const std::vector<T>& v) {
  std::vector<uint8_t> out(v.size() * sizeof(T));
  if (!out.empty()) std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// u64 header length, header text, data.
std::vector<uint8_t> assemble(const std::string& header, const std::vector<uint8_t>& data) {
  std::vector<uint8_t> out(8);
  const uint64_t n = header.size();
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// A valid file: tensors laid out back to back in the given order.
std::vector<uint8_t> build(const std::vector<Entry>& entries, const json& metadata = nullptr, size_t pad = 0) {
  json header = json::object();
  std::vector<uint8_t> data;
  for (const Entry& e : entries) {
    const uint64_t begin = data.size();
    data.insert(data.end(), e.bytes.begin(), e.bytes.end());
    header[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {begin, data.size()}}};
  }
  if (!metadata.is_null()) header["__metadata__"] = metadata;
  return assemble(header.dump() + std::string(pad, ' '), data);
}

Result<std::unique_ptr<SafetensorsFile>> parse(const std::vector<uint8_t>& bytes) {
  return SafetensorsFile::from_memory(bytes.data(), bytes.size());
}

// Three tensors of the three convertible dtypes plus metadata.
std::vector<uint8_t> small_file() {
  return build({{"a.weight", "F32", {2, 3}, raw(std::vector<float>{1, -2, 3.5f, 0, 1e-30f, -7})},
                {"b.weight", "F16", {3}, raw(std::vector<uint16_t>{0x3C00, 0xC000, 0x0001})},
                {"c.weight", "BF16", {2}, raw(std::vector<uint16_t>{0x3F80, 0xC040})}},
               json{{"format", "pt"}});
}

std::vector<float> convert(const TensorInfo& t) {
  std::vector<float> out(static_cast<size_t>(t.numel));
  Status s = to_f32(t, out.data());
  EXPECT_TRUE(s.ok()) << s.to_string();
  return out;
}

// The error of parsing `header` + `data`: its code and message.
Status header_error(const std::string& header, const std::vector<uint8_t>& data = {}) {
  auto r = parse(assemble(header, data));
  EXPECT_FALSE(r.ok()) << "accepted: " << header;
  return r.ok() ? Status() : r.status();
}

void expect_data_loss(const Status& s, const std::string& needle) {
  EXPECT_EQ(s.code(), StatusCode::kDataLoss) << s.to_string();
  EXPECT_NE(s.message().find(needle), std::string::npos) << "'" << needle << "' not in: " << s.message();
}

class TempDir {
 public:
  explicit TempDir(const std::string& tag)
      : path_(std::filesystem::temp_directory_path() /
              ("starserve_st_" + tag + "_" + std::to_string(::getpid()))) {
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~TempDir() { std::filesystem::remove_all(path_); }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

void write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// ---------------------------------------------------------------------------------------------
// Valid files

TEST(Safetensors, ParsesTensorsMetadataAndConverts) {
  const std::vector<uint8_t> bytes = small_file();
  auto r = parse(bytes);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  const SafetensorsFile& f = **r;
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.metadata().at("format"), "pt");

  const TensorInfo* a = f.find("a.weight");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, Dtype::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->numel, 6);
  EXPECT_EQ(a->n_bytes, 24u);
  EXPECT_EQ(a->data, bytes.data() + f.data_offset() + a->begin);
  EXPECT_EQ(convert(*a), (std::vector<float>{1, -2, 3.5f, 0, 1e-30f, -7}));

  const TensorInfo* b = f.find("b.weight");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, Dtype::kF16);
  // 0x0001 is the smallest fp16 subnormal, 2^-24.
  EXPECT_EQ(convert(*b), (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24)}));

  const TensorInfo* c = f.find("c.weight");
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->dtype, Dtype::kBF16);
  EXPECT_EQ(convert(*c), (std::vector<float>{1.0f, -3.0f}));

  EXPECT_EQ(f.find("missing"), nullptr);
  // Tensors come back in data order.
  EXPECT_EQ(f.tensors()[0].name, "a.weight");
  EXPECT_EQ(f.tensors()[2].name, "c.weight");
}

TEST(Safetensors, AcceptsPaddedHeaderEmptyFileScalarsAndZeroSizeTensors) {
  // Tensor data points into the buffer, so each buffer outlives its file.
  const std::vector<uint8_t> padded_bytes = build({{"x", "F32", {1}, raw(std::vector<float>{4})}}, nullptr, 7);
  auto padded = parse(padded_bytes);
  ASSERT_TRUE(padded.ok()) << padded.status().to_string();
  EXPECT_EQ(convert(*(*padded)->find("x")), std::vector<float>{4});

  auto empty = parse(assemble("{}", {}));
  ASSERT_TRUE(empty.ok()) << empty.status().to_string();
  EXPECT_TRUE((*empty)->tensors().empty());

  const std::vector<uint8_t> bytes = build({{"scalar", "F32", {}, raw(std::vector<float>{2.5f})},
                                           {"empty", "BF16", {0, 4}, {}},
                                           {"after", "F16", {1}, raw(std::vector<uint16_t>{0x3C00})}});
  auto r = parse(bytes);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ((*r)->find("scalar")->numel, 1);
  EXPECT_EQ(convert(*(*r)->find("scalar")), std::vector<float>{2.5f});
  EXPECT_EQ((*r)->find("empty")->numel, 0);
  EXPECT_EQ((*r)->find("empty")->n_bytes, 0u);
}

TEST(Safetensors, KnowsAllFormatDtypesButConvertsOnlyFloats) {
  const std::vector<uint8_t> bytes = build({{"ids", "I64", {2}, raw(std::vector<int64_t>{1, 2})},
                                           {"mask", "BOOL", {3}, {1, 0, 1}},
                                           {"f8", "F8_E4M3", {2}, {0x38, 0x40}}});
  auto r = parse(bytes);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ((*r)->find("ids")->dtype, Dtype::kI64);
  EXPECT_EQ(dtype_name(Dtype::kF8E4M3), "F8_E4M3");
  EXPECT_EQ(dtype_size(Dtype::kI64), 8);
  std::vector<float> out(2);
  Status s = to_f32(*(*r)->find("ids"), out.data());
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented);
  EXPECT_NE(s.message().find("I64"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("'ids'"), std::string::npos) << s.message();
}

TEST(Safetensors, UnknownDtypeIsUnimplementedNamingDtypeAndTensor) {
  Status s = header_error(R"({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}})", {0});
  EXPECT_EQ(s.code(), StatusCode::kUnimplemented) << s.to_string();
  EXPECT_NE(s.message().find("'F4'"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("'w'"), std::string::npos) << s.message();
}

TEST(Safetensors, OpenMapsFileAndReportsMissingPath) {
  TempDir dir("open");
  write_file(dir.file("m.safetensors"), small_file());
  auto r = SafetensorsFile::open(dir.file("m.safetensors"));
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ((*r)->path(), dir.file("m.safetensors"));
  EXPECT_EQ(convert(*(*r)->find("c.weight")), (std::vector<float>{1.0f, -3.0f}));

  auto missing = SafetensorsFile::open(dir.file("nope.safetensors"));
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);

  // Errors from open() name the file.
  write_file(dir.file("bad.safetensors"), {1, 2, 3});
  auto bad = SafetensorsFile::open(dir.file("bad.safetensors"));
  EXPECT_EQ(bad.status().code(), StatusCode::kDataLoss);
  EXPECT_NE(bad.status().message().find("bad.safetensors"), std::string::npos) << bad.status().message();
  write_file(dir.file("zero.safetensors"), {});
  EXPECT_EQ(SafetensorsFile::open(dir.file("zero.safetensors")).status().code(), StatusCode::kDataLoss);
}

// ---------------------------------------------------------------------------------------------
// Malformed files

TEST(Safetensors, RejectsBadHeaderLength) {
  expect_data_loss(parse({1, 0, 0}).status(), "too short");
  std::vector<uint8_t> bytes = small_file();
  const uint64_t too_long = bytes.size() - 8 + 1;
  std::memcpy(bytes.data(), &too_long, 8);
  expect_data_loss(parse(bytes).status(), "extends beyond the file");
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(bytes.data(), &huge, 8);
  expect_data_loss(parse(bytes).status(), "exceeds the format's limit");
}

TEST(Safetensors, RejectsInvalidJsonWithByteOffset) {
  // The error is at header byte 6 ('x'), file byte 14.
  expect_data_loss(header_error(R"({"a": x})"), "parse error at byte 14");
  expect_data_loss(header_error(""), "not valid JSON");
  expect_data_loss(header_error("{\"a\": \"\xff\"}"), "not valid JSON");  // invalid UTF-8
  expect_data_loss(header_error("[1, 2]"), "expected an object");
}

TEST(Safetensors, RejectsBadTensorEntries) {
  expect_data_loss(header_error(R"({"w": 3})"), "tensor 'w' is a JSON number");
  expect_data_loss(header_error(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})", {0, 0, 0, 0}), "'w' has no string \"dtype\"");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "data_offsets": [0, 4]}})", {0, 0, 0, 0}), "no \"shape\"");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", {0, 0, 0, 0}),
                   "each dimension must be an integer");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})", {0, 0, 0, 0}),
                   "each dimension must be an integer");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": ["1"], "data_offsets": [0, 4]}})", {0, 0, 0, 0}),
                   "each dimension must be an integer");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1,1,1,1,1,1,1,1,1], "data_offsets": [0, 4]}})"),
                   "rank 9");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [2199023255553], "data_offsets": [0, 4]}})"),
                   "each dimension must be an integer in [0, 2^40]");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1099511627776, 1099511627776], "data_offsets": [0, 4]}})"),
                   "overflows int64");
  expect_data_loss(header_error(R"({"w": {"dtype": "F64", "shape": [1099511627776, 2097152], "data_offsets": [0, 4]}})"),
                   "byte size overflows int64");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1]}})", {0, 0, 0, 0}), "no \"data_offsets\"");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})", {0, 0, 0, 0}),
                   "no \"data_offsets\"");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, -4]}})", {0, 0, 0, 0}),
                   "two non-negative integers");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", {0, 0, 0, 0}),
                   "outside the data section");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}})", {0, 0, 0, 0}),
                   "'w' has data_offsets [0, 8] outside the data section of 4 bytes");
  expect_data_loss(header_error(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", {0, 0, 0, 0}),
                   "'w' has data_offsets [0, 4] (4 bytes) but shape [2] x F32 needs 8 bytes");
  expect_data_loss(header_error(R"({"__metadata__": {"format": 1}})"), "__metadata__ key 'format'");
  expect_data_loss(header_error(R"({"__metadata__": [1]})"), "__metadata__ is a JSON array");
}

TEST(Safetensors, RejectsOverlapsHolesAndTrailingBytes) {
  const std::vector<uint8_t> data(8, 0);
  expect_data_loss(header_error(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
                                data),
                   "overlaps tensor");
  expect_data_loss(header_error(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})",
                                data),
                   "overlaps tensor");
  expect_data_loss(header_error(R"({"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", data),
                   "data bytes 0..4 (file byte");
  expect_data_loss(header_error(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", data),
                   "cover only 4");
}

// Every prefix of a valid file is an error, and the reader never reads past the buffer it was
// given (each prefix is its own allocation, so a sanitizer build would catch an overread).
TEST(Safetensors, EveryTruncationIsAnError) {
  const std::vector<uint8_t> full = small_file();
  ASSERT_TRUE(parse(full).ok());
  for (size_t n = 0; n < full.size(); ++n) {
    std::vector<uint8_t> prefix(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
    auto r = parse(prefix);
    EXPECT_FALSE(r.ok()) << "prefix of " << n << " bytes accepted";
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kDataLoss) << n << ": " << r.status().to_string();
    }
  }
}

// Flipping any byte either still parses (e.g. inside a value) or gives an error; never a crash,
// and whatever parses still satisfies the data-section invariants.
TEST(Safetensors, CorruptedBytesNeverCrash) {
  const std::vector<uint8_t> full = small_file();
  for (size_t i = 0; i < full.size(); ++i) {
    for (uint8_t mask : {0x01, 0x20, 0xFF}) {
      std::vector<uint8_t> bytes = full;
      bytes[i] ^= mask;
      auto r = parse(bytes);
      if (!r.ok()) continue;
      for (const TensorInfo& t : (*r)->tensors()) {
        EXPECT_LE((*r)->data_offset() + t.begin + t.n_bytes, bytes.size());
        std::vector<float> out(static_cast<size_t>(t.numel));
        (void)to_f32(t, out.data());
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoints

TEST(SafetensorsIndex, ParsesWeightMap) {
  auto r = parse_shard_index(R"({"metadata": {"total_size": 12},
                                 "weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors",
                                                "c": "model-00001-of-00002.safetensors"}})",
                             "index");
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(r->weight_map.size(), 3u);
  EXPECT_EQ(r->weight_map.at("b"), "model-00002-of-00002.safetensors");
  EXPECT_EQ(r->files, (std::vector<std::string>{"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}));
}

TEST(SafetensorsIndex, RejectsMalformedIndex) {
  expect_data_loss(parse_shard_index("{", "idx.json").status(), "idx.json is not valid JSON");
  expect_data_loss(parse_shard_index("[]", "idx.json").status(), "expected an object");
  expect_data_loss(parse_shard_index(R"({"metadata": {}})", "idx.json").status(), "no \"weight_map\"");
  expect_data_loss(parse_shard_index(R"({"weight_map": {}})", "idx.json").status(), "empty");
  expect_data_loss(parse_shard_index(R"({"weight_map": {"a": 1}})", "idx.json").status(), "entry 'a'");
  for (const char* bad : {"../secret.safetensors", "/etc/passwd", "sub/x.safetensors", ""}) {
    const std::string text = json{{"weight_map", {{"a", bad}}}}.dump();
    expect_data_loss(parse_shard_index(text, "idx.json").status(), "plain file name");
  }
  EXPECT_EQ(read_shard_index("/nonexistent/model.safetensors.index.json").status().code(), StatusCode::kNotFound);
}

TEST(SafetensorsCheckpoint, OpensShardedAndSingleFileDirectories) {
  TempDir dir("ckpt");
  write_file(dir.file("s1.safetensors"), build({{"a", "F32", {1}, raw(std::vector<float>{1})},
                                                {"b", "F32", {1}, raw(std::vector<float>{2})}}));
  write_file(dir.file("s2.safetensors"), build({{"c", "BF16", {1}, raw(std::vector<uint16_t>{0x4040})}}));
  write_text(dir.file("model.safetensors.index.json"),
             R"({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}})");
  auto r = Checkpoint::open_dir(dir.path().string());
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_TRUE((*r)->sharded());
  EXPECT_EQ((*r)->n_files(), 2u);
  EXPECT_EQ((*r)->names(), (std::vector<std::string>{"a", "b", "c"}));
  ASSERT_NE((*r)->find("c"), nullptr);
  EXPECT_EQ(convert(*(*r)->find("c")), std::vector<float>{3.0f});

  // The index names a tensor its shard does not hold.
  write_text(dir.file("model.safetensors.index.json"), R"({"weight_map": {"a": "s2.safetensors"}})");
  auto wrong = Checkpoint::open_dir(dir.path().string());
  expect_data_loss(wrong.status(), "maps tensor 'a' to s2.safetensors");

  // A listed shard is missing.
  write_text(dir.file("model.safetensors.index.json"), R"({"weight_map": {"a": "s3.safetensors"}})");
  auto missing = Checkpoint::open_dir(dir.path().string());
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound) << missing.status().to_string();
  EXPECT_NE(missing.status().message().find("s3.safetensors"), std::string::npos);

  // Without an index: model.safetensors, else nothing.
  std::filesystem::remove(dir.file("model.safetensors.index.json"));
  EXPECT_EQ(Checkpoint::open_dir(dir.path().string()).status().code(), StatusCode::kNotFound);
  write_file(dir.file("model.safetensors"), small_file());
  auto single = Checkpoint::open_dir(dir.path().string());
  ASSERT_TRUE(single.ok()) << single.status().to_string();
  EXPECT_FALSE((*single)->sharded());
  EXPECT_EQ((*single)->names().size(), 3u);
}

}  // namespace
}  // namespace starserve::safetensors
