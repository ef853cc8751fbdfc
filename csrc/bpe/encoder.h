// Byte-level BPE encoder and decoder over a ranked vocabulary (rank == token id, as in tiktoken).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "hash.h"

namespace gpt2fast::bpe {

using Rank = std::uint32_t;
inline constexpr Rank kNoRank = ~0U;

// Raised for input the caller can fix: bad ids, inconsistent vocabularies. Bound to ValueError.
class InputError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

struct SpecialToken {
  std::string text;
  Rank id;
};

// Per-thread memo of pieces that are not whole tokens, so a frequent word is merged once.
class PieceCache {
 public:
  bool find(std::uint64_t owner, std::string_view piece, std::uint64_t hash, std::vector<Rank>& out);
  void insert(std::uint64_t owner, std::string_view piece, std::uint64_t hash, const Rank* ids, std::size_t n);

 private:
  struct Slot {
    std::uint64_t hash = 0;
    std::uint32_t key_offset = 0, key_len = 0, value_offset = 0, value_len = 0;
    bool used = false;
  };
  void reset(std::uint64_t owner);

  std::uint64_t owner_ = 0;
  std::vector<Slot> slots_;
  std::size_t used_ = 0;
  std::string keys_;
  std::vector<Rank> values_;
};

class Encoder {
 public:
  // tokens[r] holds the bytes of the token of rank r. Every single byte must be a token.
  Encoder(std::vector<std::string> tokens, std::vector<SpecialToken> specials);
  Encoder(const Encoder&) = delete;
  Encoder& operator=(const Encoder&) = delete;

  // Appends the ids of `text` with no special-token handling.
  void encode_ordinary(std::string_view text, std::vector<Rank>& out) const;
  // Splits `text` at occurrences of the specials in `allowed` (indices into specials()), which become
  // their ids; the text between them is encoded ordinarily.
  void encode_with_specials(std::string_view text, const std::vector<std::size_t>& allowed,
                            std::vector<Rank>& out) const;
  // BPE of one piece, no cache: the reference path the tests compare the cached one against.
  void encode_piece_uncached(std::string_view piece, std::vector<Rank>& out) const;

  // Appends the bytes of ids[0..n); throws InputError naming the first id outside the vocabulary.
  template <class Id>
  void decode_bytes(const Id* ids, std::size_t n, std::string& out) const {
    for (std::size_t k = 0; k < n; ++k) {
      const auto id = ids[k];
      if (id < 0 || static_cast<std::uint64_t>(id) >= decode_offsets_.size() - 1 ||
          !decodable_[static_cast<std::size_t>(id)])
        throw_bad_id(static_cast<long long>(id), k);
      const auto b = decode_offsets_[static_cast<std::size_t>(id)];
      const auto e = decode_offsets_[static_cast<std::size_t>(id) + 1];
      out.append(decode_blob_, b, e - b);
    }
  }

  // Rank of a whole byte string, or kNoRank.
  Rank rank_of(std::string_view bytes) const;
  std::string_view token_bytes(Rank id) const;
  std::size_t n_ordinary() const { return n_ordinary_; }
  std::size_t n_vocab() const { return decode_offsets_.size() - 1; }
  const std::vector<SpecialToken>& specials() const { return specials_; }
  Rank byte_rank(unsigned char b) const { return byte_ranks_[b]; }
  Rank pair_rank(Rank left, Rank right) const { return pair_ranks_.get(pair_key(left, right)); }
  std::size_t memory_bytes() const;
  // The heap-based merge used for long pieces, callable on any piece so tests can compare it with the
  // short-piece path.
  void merge_long(std::string_view piece, std::vector<Rank>& out) const;

 private:
  [[noreturn]] void throw_bad_id(long long id, std::size_t position) const;
  void encode_piece(std::string_view piece, std::vector<Rank>& out, PieceCache& cache) const;
  void merge_short(std::vector<Rank>& parts, std::vector<Rank>& pair_ranks) const;

  std::uint64_t serial_;  // tells per-thread caches which encoder filled them
  std::size_t n_ordinary_ = 0;
  // id -> bytes for ordinary and special tokens alike; decode_offsets_ has n_vocab + 1 entries.
  std::string decode_blob_;
  std::vector<std::uint32_t> decode_offsets_;
  std::vector<bool> decodable_;
  // bytes -> rank for ordinary tokens: open addressing over ranks, hashed by their bytes.
  std::vector<Rank> token_slots_;
  std::size_t token_mask_ = 0;
  Rank byte_ranks_[256];
  U64Map pair_ranks_;  // (left, right) -> rank of their concatenation, when it is a token
  std::vector<SpecialToken> specials_;
};

// Length in characters of the UTF-8 text s[0..n): how a byte offset becomes a Python str index.
std::size_t utf8_length(const char* s, std::size_t n);

}  // namespace gpt2fast::bpe
