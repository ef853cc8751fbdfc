// Reading vocabularies: GPT-2's encoder.json + vocab.bpe, and tiktoken's ranks file.
// Every malformed input is an InputError that says which file, where, and what was expected.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "encoder.h"

namespace gpt2fast::bpe {

struct Vocabulary {
  std::vector<std::string> tokens;            // by rank
  std::vector<SpecialToken> specials;
  std::vector<std::pair<Rank, Rank>> merges;  // merges[i] made token 256 + i (empty when unknown)
};

// GPT-2's format, read the way GPT-2 (and tiktoken's loader) read it: the ranks come from vocab.bpe (the
// 256 bytes in GPT-2's order, then one token per merge line), and encoder.json must agree with them;
// its entries beyond those ranks are the special tokens.
Vocabulary parse_gpt2_files(std::string_view encoder_json, std::string_view vocab_bpe);

// tiktoken's format: one "<base64 bytes> <rank>" per line, ranks 0..n-1 each once.
Vocabulary parse_tiktoken(std::string_view text);

// GPT-2's printable spelling of a byte string (what vocab.bpe and encoder.json hold), and back.
std::string bytes_to_gpt2_text(std::string_view bytes);
// Returns false when `text` uses a character outside GPT-2's byte alphabet.
bool gpt2_text_to_bytes(std::string_view text, std::string& out);

// For each token from rank 256 on, two tokens of lower rank whose bytes join to it; throws when the
// vocabulary cannot be written in GPT-2's format (byte tokens out of GPT-2's order, or no such split).
std::vector<std::pair<Rank, Rank>> derive_merges(const Encoder& encoder);

}  // namespace gpt2fast::bpe
