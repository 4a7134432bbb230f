// Hugging Face tokenizer.json (+ tokenizer_config.json) -> TokenizerSpec -> Tokenizer. The JSON layout is that of the
// `tokenizers` library's serialization: model, normalizer, pre_tokenizer, post_processor, decoder, added_tokens.
#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "model/tokenizer.h"

namespace starserve {
namespace {

using nlohmann::json;

Result<json> read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found("cannot open {}", path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  json doc = json::parse(buffer.str(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return data_loss("{} is not valid JSON", path);
  return doc;
}

// Member `key` of an object, nullptr when absent or null.
const json* member(const json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::string string_member(const json& obj, std::string_view key) {
  const json* v = member(obj, key);
  return v != nullptr && v->is_string() ? v->get<std::string>() : std::string();
}

bool bool_member(const json& obj, std::string_view key, bool fallback) {
  const json* v = member(obj, key);
  return v != nullptr && v->is_boolean() ? v->get<bool>() : fallback;
}

// A literal for PCRE2: every ASCII punctuation character escaped.
std::string regex_escape(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u)) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

// {"String": "x"} or {"Regex": "..."} as a PCRE2 pattern; is_regex tells which.
Status read_pattern(const json& node, const std::string& where, std::string_view owner, std::string& pattern,
                    bool& is_regex) {
  const json* p = member(node, "pattern");
  if (p == nullptr) return data_loss("{}: {} without 'pattern'", where, owner);
  if (const json* re = member(*p, "Regex"); re != nullptr && re->is_string()) {
    pattern = re->get<std::string>();
    is_regex = true;
  } else if (const json* lit = member(*p, "String"); lit != nullptr && lit->is_string()) {
    pattern = lit->get<std::string>();
    is_regex = false;
  } else {
    return data_loss("{}: {} pattern is neither Regex nor String", where, owner);
  }
  return Status::ok_status();
}

std::string node_type(const json& node) {
  const std::string type = string_member(node, "type");
  return type.empty() ? node.dump() : type;
}

Status add_normalizer(const json& node, const std::string& where, std::vector<NormalizerStep>& out) {
  const std::string type = string_member(node, "type");
  NormalizerStep step;
  if (type == "Sequence") {
    const json* list = member(node, "normalizers");
    if (list == nullptr || !list->is_array()) return data_loss("{}: normalizer Sequence without 'normalizers'", where);
    for (const json& child : *list) SS_RETURN_IF_ERROR(add_normalizer(child, where, out));
    return Status::ok_status();
  }
  if (type == "NFC") {
    step.kind = NormalizerStep::Kind::kNfc;
  } else if (type == "NFD") {
    step.kind = NormalizerStep::Kind::kNfd;
  } else if (type == "NFKC") {
    step.kind = NormalizerStep::Kind::kNfkc;
  } else if (type == "NFKD") {
    step.kind = NormalizerStep::Kind::kNfkd;
  } else if (type == "Lowercase") {
    step.kind = NormalizerStep::Kind::kLowercase;
  } else if (type == "Prepend") {
    step.kind = NormalizerStep::Kind::kPrepend;
    step.content = string_member(node, "prepend");
  } else if (type == "Replace") {
    step.kind = NormalizerStep::Kind::kReplace;
    SS_RETURN_IF_ERROR(read_pattern(node, where, "normalizer Replace", step.pattern, step.pattern_is_regex));
    step.content = string_member(node, "content");
  } else if (type == "Strip") {
    step.kind = NormalizerStep::Kind::kStrip;
    step.strip_left = bool_member(node, "strip_left", true);
    step.strip_right = bool_member(node, "strip_right", true);
  } else {
    return unimplemented(
        "{}: normalizer '{}' is not supported (supported: Sequence, NFC, NFD, NFKC, NFKD, Lowercase, Prepend, "
        "Replace, Strip)",
        where, node_type(node));
  }
  out.push_back(std::move(step));
  return Status::ok_status();
}

// Maps a pre_tokenizer node to steps. For a byte-level model the byte mapping must be the last step (later steps
// would see "Ġ" instead of spaces).
Status add_pre_tokenizer(const json& node, const std::string& where, std::vector<PreTokenizerStep>& steps,
                         bool& byte_level_seen) {
  const std::string type = string_member(node, "type");
  if (byte_level_seen) return unimplemented("{}: pre-tokenizer '{}' after ByteLevel is not supported", where, type);
  if (type == "Sequence") {
    const json* list = member(node, "pretokenizers");
    if (list == nullptr || !list->is_array()) return data_loss("{}: Sequence without 'pretokenizers'", where);
    for (const json& child : *list) SS_RETURN_IF_ERROR(add_pre_tokenizer(child, where, steps, byte_level_seen));
    return Status::ok_status();
  }
  PreTokenizerStep step;
  if (type == "Split") {
    const std::string behavior = string_member(node, "behavior");
    using B = PreTokenizerStep::Behavior;
    if (behavior == "Isolated") {
      step.behavior = B::kIsolated;
    } else if (behavior == "Removed") {
      step.behavior = B::kRemoved;
    } else if (behavior == "MergedWithPrevious") {
      step.behavior = B::kMergedWithPrevious;
    } else if (behavior == "MergedWithNext") {
      step.behavior = B::kMergedWithNext;
    } else {
      return unimplemented(
          "{}: Split behavior '{}' is not supported (supported: Isolated, Removed, MergedWithPrevious, "
          "MergedWithNext)",
          where, behavior);
    }
    step.invert = bool_member(node, "invert", false);
    if (step.invert && step.behavior != B::kIsolated) {
      return unimplemented("{}: Split with invert=true is supported only with behavior Isolated", where);
    }
    bool is_regex = false;
    SS_RETURN_IF_ERROR(read_pattern(node, where, "Split", step.pattern, is_regex));
    if (!is_regex) step.pattern = regex_escape(step.pattern);
    steps.push_back(std::move(step));
    return Status::ok_status();
  }
  if (type == "Digits") {
    step.pattern = bool_member(node, "individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)";
    steps.push_back(std::move(step));
    return Status::ok_status();
  }
  if (type == "ByteLevel") {
    if (bool_member(node, "add_prefix_space", false)) {
      return unimplemented("{}: ByteLevel with add_prefix_space=true is not supported", where);
    }
    if (bool_member(node, "use_regex", true)) {
      step.pattern = std::string(gpt2_pre_tokenizer_regex());
      steps.push_back(std::move(step));
    }
    byte_level_seen = true;
    return Status::ok_status();
  }
  if (type == "Metaspace") {
    step.kind = PreTokenizerStep::Kind::kMetaspace;
    step.replacement = string_member(node, "replacement");
    if (step.replacement.empty()) return data_loss("{}: Metaspace without 'replacement'", where);
    const std::string scheme = string_member(node, "prepend_scheme");
    if (scheme == "always") {
      step.prepend = PreTokenizerStep::Prepend::kAlways;
    } else if (scheme == "first") {
      step.prepend = PreTokenizerStep::Prepend::kFirst;
    } else if (scheme == "never") {
      step.prepend = PreTokenizerStep::Prepend::kNever;
    } else if (scheme.empty()) {  // older files: add_prefix_space
      step.prepend = bool_member(node, "add_prefix_space", true) ? PreTokenizerStep::Prepend::kAlways
                                                                 : PreTokenizerStep::Prepend::kNever;
    } else {
      return unimplemented("{}: Metaspace prepend_scheme '{}' is not supported", where, scheme);
    }
    step.split = bool_member(node, "split", true);
    steps.push_back(std::move(step));
    return Status::ok_status();
  }
  return unimplemented(
      "{}: pre-tokenizer '{}' is not supported (supported: Sequence, Split, Digits, ByteLevel, Metaspace)", where,
      node_type(node));
}

// The decoder chain of a SentencePiece-style BPE: Replace("\u2581", " "), ByteFallback, Fuse, Strip(" ", n, 0),
// Metaspace. Strip must come after Fuse (it then strips the start of the whole text, not of every token).
Status read_sp_decoder(const json& node, const std::string& where, SpDecoderSpec& out, bool& fused) {
  const std::string type = string_member(node, "type");
  if (type == "Sequence") {
    const json* list = member(node, "decoders");
    if (list == nullptr || !list->is_array()) return data_loss("{}: decoder Sequence without 'decoders'", where);
    for (const json& child : *list) SS_RETURN_IF_ERROR(read_sp_decoder(child, where, out, fused));
    return Status::ok_status();
  }
  if (type == "Replace") {
    std::string pattern;
    bool is_regex = false;
    SS_RETURN_IF_ERROR(read_pattern(node, where, "decoder Replace", pattern, is_regex));
    if (is_regex || pattern != "\u2581" || string_member(node, "content") != " ") {
      return unimplemented("{}: decoder Replace other than \"\u2581\" -> \" \" is not supported", where);
    }
    out.replace_marker = true;
    return Status::ok_status();
  }
  if (type == "ByteFallback") {
    out.byte_fallback = true;
    return Status::ok_status();
  }
  if (type == "Fuse") {
    fused = true;
    return Status::ok_status();
  }
  if (type == "Strip") {
    const json* start = member(node, "start");
    const json* stop = member(node, "stop");
    if (string_member(node, "content") != " " || !fused || (stop != nullptr && stop->is_number() &&
                                                             stop->get<int64_t>() != 0)) {
      return unimplemented("{}: decoder Strip is supported only as Strip(\" \", start=n, stop=0) after Fuse", where);
    }
    out.strip_leading = start != nullptr && start->is_number_integer() ? start->get<int>() : 0;
    return Status::ok_status();
  }
  if (type == "Metaspace") {
    if (string_member(node, "replacement") != "\u2581") {
      return unimplemented("{}: decoder Metaspace with replacement other than \"\u2581\" is not supported", where);
    }
    out.replace_marker = true;
    const std::string scheme = string_member(node, "prepend_scheme");
    out.metaspace_first = scheme.empty() ? bool_member(node, "add_prefix_space", true) : scheme != "never";
    return Status::ok_status();
  }
  return unimplemented(
      "{}: decoder '{}' is not supported with byte fallback BPE (supported: Sequence, Replace, ByteFallback, Fuse, "
      "Strip, Metaspace)",
      where, node_type(node));
}

// Which special tokens a TemplateProcessing post-processor puts around a single sequence.
Status read_post_processor(const json& node, const std::string& where, std::optional<int32_t>& prefix,
                           std::optional<int32_t>& suffix) {
  const std::string type = string_member(node, "type");
  if (type == "ByteLevel") return Status::ok_status();  // offsets only
  if (type == "Sequence") {
    const json* list = member(node, "processors");
    if (list == nullptr || !list->is_array()) return data_loss("{}: Sequence without 'processors'", where);
    for (const json& child : *list) SS_RETURN_IF_ERROR(read_post_processor(child, where, prefix, suffix));
    return Status::ok_status();
  }
  if (type != "TemplateProcessing") {
    return unimplemented("{}: post-processor '{}' is not supported (supported: TemplateProcessing, ByteLevel)", where,
                         type);
  }
  const json* single = member(node, "single");
  const json* special_tokens = member(node, "special_tokens");
  if (single == nullptr || !single->is_array()) return data_loss("{}: TemplateProcessing without 'single'", where);
  bool seen_sequence = false;
  for (const json& item : *single) {
    if (member(item, "Sequence") != nullptr) {
      seen_sequence = true;
      continue;
    }
    const json* st = member(item, "SpecialToken");
    if (st == nullptr) return data_loss("{}: TemplateProcessing item {} is not understood", where, item.dump());
    const std::string name = string_member(*st, "id");
    const json* entry = special_tokens != nullptr ? member(*special_tokens, name) : nullptr;
    const json* ids = entry != nullptr ? member(*entry, "ids") : nullptr;
    if (ids == nullptr || !ids->is_array() || ids->size() != 1 || !(*ids)[0].is_number_integer()) {
      return unimplemented("{}: TemplateProcessing token '{}' must map to exactly one id", where, name);
    }
    std::optional<int32_t>& slot = seen_sequence ? suffix : prefix;
    if (slot) return unimplemented("{}: more than one special token on one side of the sequence", where);
    slot = (*ids)[0].get<int32_t>();
  }
  return Status::ok_status();
}

// tokenizer_config.json names special tokens as a string or as {"content": ...}.
std::string config_token_text(const json& config, std::string_view key) {
  const json* v = member(config, key);
  if (v == nullptr) return {};
  if (v->is_string()) return v->get<std::string>();
  return string_member(*v, "content");
}

}  // namespace

Result<Tokenizer> Tokenizer::from_hf_json(const std::string& tokenizer_json_path,
                                          const std::string& tokenizer_config_path_or_empty) {
  SS_ASSIGN_OR_RETURN(json doc, read_json_file(tokenizer_json_path));
  const std::string& where = tokenizer_json_path;
  TokenizerSpec spec;
  spec.pre = "tokenizer.json";

  const json* model = member(doc, "model");
  if (model == nullptr) return data_loss("{}: no 'model'", where);
  const std::string model_type = string_member(*model, "type");
  if (!(model_type == "BPE" || (model_type.empty() && member(*model, "merges") != nullptr))) {
    return unimplemented("{}: model type '{}' is not supported (only BPE)", where, model_type);
  }
  if (!string_member(*model, "continuing_subword_prefix").empty() ||
      !string_member(*model, "end_of_word_suffix").empty()) {
    return unimplemented("{}: BPE subword prefix/suffix is not supported", where);
  }
  if (const json* dropout = member(*model, "dropout"); dropout != nullptr && dropout->is_number() &&
                                                        dropout->get<double>() > 0.0) {
    return unimplemented("{}: BPE dropout is not supported", where);
  }
  spec.ignore_merges = bool_member(*model, "ignore_merges", false);
  spec.byte_fallback = bool_member(*model, "byte_fallback", false);
  spec.fuse_unk = bool_member(*model, "fuse_unk", false);

  // Pre-tokenizer first: a ByteLevel step makes this a byte-level BPE, its absence a character-level one.
  const json* pre = member(doc, "pre_tokenizer");
  bool byte_level = false;
  if (pre != nullptr) SS_RETURN_IF_ERROR(add_pre_tokenizer(*pre, where, spec.pre_steps, byte_level));
  spec.model = byte_level ? "gpt2" : "llama";
  if (byte_level && spec.byte_fallback) {
    return unimplemented("{}: BPE byte_fallback with a ByteLevel pre-tokenizer is not supported", where);
  }
  if (byte_level) {
    // An empty step list would mean "use the named pre-tokenizer"; ByteLevel(use_regex=false) alone means no split.
    if (spec.pre_steps.empty()) {
      PreTokenizerStep whole;
      whole.pattern = R"((?s).+)";
      spec.pre_steps.push_back(std::move(whole));
    }
    for (const PreTokenizerStep& step : spec.pre_steps) {
      if (step.kind == PreTokenizerStep::Kind::kMetaspace) {
        return unimplemented("{}: Metaspace and ByteLevel pre-tokenizers together are not supported", where);
      }
    }
  }

  // Vocabulary: the model's vocab plus added tokens, dense by id.
  const json* vocab = member(*model, "vocab");
  if (vocab == nullptr || !vocab->is_object()) return data_loss("{}: model has no 'vocab' object", where);
  const json* added = member(doc, "added_tokens");
  int64_t max_id = -1;
  for (const auto& [text, id] : vocab->items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= INT32_MAX) {
      return data_loss("{}: vocab entry '{}' has id {}", where, text, id.dump());
    }
    max_id = std::max(max_id, id.get<int64_t>());
  }
  if (added != nullptr) {
    if (!added->is_array()) return data_loss("{}: 'added_tokens' is not an array", where);
    for (const json& a : *added) {
      const json* id = member(a, "id");
      if (id == nullptr || !id->is_number_integer() || id->get<int64_t>() < 0 || id->get<int64_t>() >= INT32_MAX) {
        return data_loss("{}: added token {} has no valid id", where, a.dump());
      }
      max_id = std::max(max_id, id->get<int64_t>());
    }
  }
  if (max_id < 0) return data_loss("{}: empty vocabulary", where);
  spec.tokens.assign(static_cast<size_t>(max_id + 1), std::string());
  spec.token_types.assign(static_cast<size_t>(max_id + 1), static_cast<int32_t>(TokenType::kUnused));
  for (const auto& [text, id] : vocab->items()) {
    spec.tokens[id.get<size_t>()] = text;
    const bool byte = !byte_level && text.size() == 6 && text.compare(0, 3, "<0x") == 0 && text[5] == '>';
    spec.token_types[id.get<size_t>()] = static_cast<int32_t>(byte ? TokenType::kByte : TokenType::kNormal);
  }
  if (added != nullptr) {
    for (const json& a : *added) {
      AddedTokenSpec opt;
      opt.id = member(a, "id")->get<int32_t>();
      const bool special = bool_member(a, "special", false);
      opt.lstrip = bool_member(a, "lstrip", false);
      opt.rstrip = bool_member(a, "rstrip", false);
      opt.single_word = bool_member(a, "single_word", false);
      opt.normalized = bool_member(a, "normalized", !special);
      const std::string content = string_member(a, "content");
      if (content.empty()) return data_loss("{}: added token {} has no content", where, opt.id);
      spec.tokens[static_cast<size_t>(opt.id)] = content;
      spec.token_types[static_cast<size_t>(opt.id)] =
          static_cast<int32_t>(special ? TokenType::kControl : TokenType::kUserDefined);
      spec.added_tokens.push_back(opt);
    }
  }
  auto find_text = [&](const std::string& text) -> std::optional<int32_t> {
    if (text.empty()) return std::nullopt;
    for (size_t i = 0; i < spec.tokens.size(); ++i) {
      if (spec.tokens[i] == text) return static_cast<int32_t>(i);
    }
    return std::nullopt;
  };

  // Merges: "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs.
  const json* merges = member(*model, "merges");
  if (merges == nullptr || !merges->is_array()) return data_loss("{}: model has no 'merges' array", where);
  spec.merges.reserve(merges->size());
  for (const json& m : *merges) {
    if (m.is_string()) {
      spec.merges.push_back(m.get<std::string>());
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      spec.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
    } else {
      return data_loss("{}: merge {} is neither 'a b' nor [a, b]", where, m.dump());
    }
  }
  if (!byte_level && spec.merges.empty()) {
    return data_loss("{}: a character-level BPE without merges has nothing to merge by", where);
  }
  if (const std::string unk = string_member(*model, "unk_token"); !unk.empty()) spec.unk_id = find_text(unk);

  if (const json* normalizer = member(doc, "normalizer"); normalizer != nullptr) {
    SS_RETURN_IF_ERROR(add_normalizer(*normalizer, where, spec.normalizers));
  }

  if (const json* decoder = member(doc, "decoder"); decoder != nullptr) {
    if (byte_level) {
      if (string_member(*decoder, "type") != "ByteLevel") {
        return unimplemented("{}: decoder '{}' is not supported with a byte-level BPE (only ByteLevel)", where,
                             node_type(*decoder));
      }
    } else {
      spec.sp_decoder = SpDecoderSpec{};
      spec.sp_decoder.replace_marker = false;
      spec.sp_decoder.byte_fallback = false;
      bool fused = false;
      SS_RETURN_IF_ERROR(read_sp_decoder(*decoder, where, spec.sp_decoder, fused));
    }
  } else if (!byte_level) {
    return unimplemented("{}: a character-level BPE without a decoder is not supported", where);
  }

  std::optional<int32_t> prefix, suffix;
  if (const json* post = member(doc, "post_processor"); post != nullptr) {
    SS_RETURN_IF_ERROR(read_post_processor(*post, where, prefix, suffix));
  }
  if (prefix) {
    spec.bos_id = prefix;
    spec.add_bos = true;
  }
  if (suffix) {
    spec.eos_id = suffix;
    spec.add_eos = true;
  }

  if (!tokenizer_config_path_or_empty.empty()) {
    SS_ASSIGN_OR_RETURN(json config, read_json_file(tokenizer_config_path_or_empty));
    const std::string& cwhere = tokenizer_config_path_or_empty;
    const std::pair<const char*, std::optional<int32_t>*> named[] = {
        {"bos_token", &spec.bos_id}, {"eos_token", &spec.eos_id}, {"pad_token", &spec.pad_id},
        {"unk_token", &spec.unk_id}};
    for (const auto& [key, slot] : named) {
      const std::string text = config_token_text(config, key);
      if (text.empty()) continue;
      auto id = find_text(text);
      if (!id) return data_loss("{}: {} '{}' is not in the vocabulary", cwhere, key, text);
      // The post-processor decides what encode() adds; the config only fills ids it did not name.
      if (std::string(key) == "bos_token" && prefix) continue;
      if (std::string(key) == "eos_token" && suffix) continue;
      *slot = id;
    }
    if (const json* v = member(config, "add_bos_token"); v != nullptr && v->is_boolean()) spec.add_bos = v->get<bool>();
    if (const json* v = member(config, "add_eos_token"); v != nullptr && v->is_boolean()) spec.add_eos = v->get<bool>();
    if (const json* ct = member(config, "chat_template"); ct != nullptr) {
      if (ct->is_string()) {
        spec.chat_template = ct->get<std::string>();
      } else if (ct->is_array()) {  // [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        for (const json& entry : *ct) {
          if (string_member(entry, "name") == "default") spec.chat_template = string_member(entry, "template");
        }
      }
    }
  }
  return create(std::move(spec));
}

}  // namespace starserve
