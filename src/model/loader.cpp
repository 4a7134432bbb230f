#include "model/loader.h"

#include <filesystem>

#include "model/gguf_source.h"
#include "model/hf_source.h"
#include "model/tokenizer_gguf.h"

namespace starserve {

Result<ModelFiles> open_model_files(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) return not_found("model path {} does not exist", path);
  ModelFiles files;
  if (fs::is_directory(path, ec)) {
    SS_ASSIGN_OR_RETURN(auto hf, HfWeightSource::open(path));
    const std::string tok_json = hf->tokenizer_json_path();
    if (tok_json.empty()) return not_found("{} has no tokenizer.json", path);
    SS_ASSIGN_OR_RETURN(Tokenizer tok, Tokenizer::from_hf_json(tok_json, hf->tokenizer_config_path()));
    files.tokenizer = std::make_unique<Tokenizer>(std::move(tok));
    files.weights = std::move(hf);
    files.format = "hf";
    return files;
  }
  SS_ASSIGN_OR_RETURN(auto gg, GgufWeightSource::open(path));
  SS_ASSIGN_OR_RETURN(TokenizerSpec spec, tokenizer_spec_from_gguf(gg->file()));
  SS_ASSIGN_OR_RETURN(Tokenizer tok, Tokenizer::create(std::move(spec)));
  files.tokenizer = std::make_unique<Tokenizer>(std::move(tok));
  files.weights = std::move(gg);
  files.format = "gguf";
  return files;
}

}  // namespace starserve
