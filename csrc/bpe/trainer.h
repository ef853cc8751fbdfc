// Learning a byte-level BPE vocabulary the GPT-2 way.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "encoder.h"

namespace gpt2fast::bpe {

struct TrainResult {
  std::vector<std::string> tokens;              // by rank: the 256 bytes in GPT-2's order, then merges
  std::vector<std::pair<Rank, Rank>> merges;    // merges[i] made token 256 + i
};

// Learns merges until there are `n_ordinary` tokens or no pair occurs any more.
//  - Texts are cut at occurrences of `split_on` (the special tokens), which are never learned, then
//    pre-tokenized with GPT-2's rules; merges never cross a piece boundary.
//  - Each step merges the most frequent adjacent pair; ties go to the smallest (left id, right id).
//  - When a pair's bytes are already a token (made earlier from another split), the pair is merged into
//    that token and no new token is added.
//  - Pair counts are kept up to date incrementally: a merge touches only the words that contain it.
// Pre-tokenizing and counting run on `num_threads` threads; the result does not depend on it.
TrainResult train_bpe(const std::vector<std::string_view>& texts, std::size_t n_ordinary,
                      const std::vector<std::string>& split_on, unsigned num_threads);

// The order of the 256 byte tokens in GPT-2's vocabulary: printable bytes first, then the rest.
const std::vector<unsigned char>& gpt2_byte_order();
// GPT-2's reversible byte -> printable character map (the characters vocab.bpe and encoder.json use).
const std::vector<char32_t>& gpt2_byte_to_unicode();

}  // namespace gpt2fast::bpe
