// A byte-level tokenizer with exactly n_vocab tokens and no merges, for tests that drive the serving
// engine over random-weight models: the engine needs a tokenizer to turn tokens into text, and
// these models' token ids mean nothing. Ids 33..126 are their ASCII characters; every other id is
// the text "t<id>". No BOS/EOS, so generation ends only by max_tokens.
#pragma once

#include <string>

#include "common/check.h"
#include "model/tokenizer.h"

namespace starserve::testing_engine {

inline Tokenizer tiny_tokenizer(int n_vocab) {
  TokenizerSpec spec;
  spec.model = "gpt2";
  for (int i = 0; i < n_vocab; ++i) {
    spec.tokens.push_back(i >= 33 && i <= 126 ? std::string(1, static_cast<char>(i)) : "t" + std::to_string(i));
  }
  auto tok = Tokenizer::create(std::move(spec));
  SS_CHECK(tok.ok(), "{}", tok.status().to_string());
  return std::move(tok).value();
}

}  // namespace starserve::testing_engine
