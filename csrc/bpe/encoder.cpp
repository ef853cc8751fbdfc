#include "encoder.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>

#include "pretokenize.h"

namespace gpt2fast::bpe {
namespace {

std::atomic<std::uint64_t> next_serial{1};

// Pieces up to this length are merged with the simple scan (quadratic but tiny); longer ones with a
// heap, so one pathological piece (a million identical letters) costs n log n, not n^2.
constexpr std::size_t kShortPiece = 128;
// Longer pieces are rare and not worth memoising.
constexpr std::size_t kMaxCachedPiece = 64;
constexpr std::size_t kCacheInitialSlots = 1u << 12;
constexpr std::size_t kCacheMaxSlots = 1u << 16;

// The tokens in a byte trie, forwards or backwards: walking one token down it meets, in one pass, every prefix
// (or suffix) of it that is itself a token. That is how the pair table is built in time linear in the
// vocabulary's bytes; hashing both sides of every split point instead is quadratic in the longest token, and a
// vocabulary trained on a million identical letters has tokens of hundreds of thousands of bytes.
class TokenTrie {
 public:
  TokenTrie(const std::vector<std::string>& tokens, bool backwards) : backwards_(backwards) {
    std::size_t bytes = 0;
    for (const std::string& t : tokens) bytes += t.size();
    nodes_.reserve(std::min<std::size_t>(bytes, tokens.size() * 16) + 1);
    nodes_.push_back(Node{});  // the root: the empty string
    for (Rank r = 0; r < tokens.size(); ++r) {
      const std::string& t = tokens[r];
      std::uint32_t node = 0;
      for (std::size_t i = 0; i < t.size(); ++i) {
        const unsigned char b = byte_at(t, i);
        std::uint32_t child = step(node, b);
        if (child == kNone) {
          child = static_cast<std::uint32_t>(nodes_.size());
          nodes_.push_back(Node{});
          if (nodes_[node].first_byte < 0) {
            nodes_[node].first_byte = b;
            nodes_[node].first_child = child;
          } else {
            others_.set(edge(node, b), child);
          }
        }
        node = child;
      }
      nodes_[node].rank = r;
    }
  }

  // ranks[k] = rank of the token that is t's first k bytes (last k when backwards), or kNoRank, k < |t|.
  void proper_parts(std::string_view t, std::vector<Rank>& ranks) const {
    ranks.assign(t.size(), kNoRank);
    std::uint32_t node = 0;
    for (std::size_t i = 0; i + 1 < t.size(); ++i) {
      node = step(node, byte_at(t, i));
      if (node == kNone) return;
      ranks[i + 1] = nodes_[node].rank;
    }
  }

 private:
  static constexpr std::uint32_t kNone = U64Map::kMissing;
  // Most nodes have one child (long tokens are chains), kept in the node itself: a walk down a chain then
  // reads consecutive nodes instead of probing a hash table at random, which is what makes the walk fast.
  struct Node {
    Rank rank = kNoRank;           // the token spelled from the root to here, or kNoRank
    std::int16_t first_byte = -1;  // the first child's byte, or -1 for a leaf
    std::uint32_t first_child = kNone;
  };
  static std::uint64_t edge(std::uint32_t node, unsigned char byte) {
    return (static_cast<std::uint64_t>(node) << 8) | byte;
  }
  unsigned char byte_at(std::string_view t, std::size_t i) const {
    return static_cast<unsigned char>(backwards_ ? t[t.size() - 1 - i] : t[i]);
  }
  std::uint32_t step(std::uint32_t node, unsigned char b) const {
    const Node& n = nodes_[node];
    if (n.first_byte == b) return n.first_child;
    return n.first_byte < 0 ? kNone : others_.get(edge(node, b));
  }

  bool backwards_;
  std::vector<Node> nodes_;
  U64Map others_;  // (node, byte) -> child, for every child but a node's first
};

std::string printable(std::string_view bytes) {
  std::string out;
  for (unsigned char c : bytes) {
    if (c >= 0x20 && c < 0x7F && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    }
  }
  return out;
}

struct MergeScratch {
  std::vector<Rank> parts, ranks;
};

}  // namespace

void PieceCache::reset(std::uint64_t owner) {
  owner_ = owner;
  slots_.assign(kCacheInitialSlots, Slot{});
  used_ = 0;
  keys_.clear();
  values_.clear();
}

bool PieceCache::find(std::uint64_t owner, std::string_view piece, std::uint64_t hash,
                      std::vector<Rank>& out) {
  if (owner != owner_ || slots_.empty()) return false;
  const std::size_t mask = slots_.size() - 1;
  for (std::size_t i = hash & mask;; i = (i + 1) & mask) {
    const Slot& s = slots_[i];
    if (!s.used) return false;
    if (s.hash == hash && s.key_len == piece.size() &&
        std::memcmp(keys_.data() + s.key_offset, piece.data(), piece.size()) == 0) {
      out.insert(out.end(), values_.begin() + s.value_offset,
                 values_.begin() + s.value_offset + s.value_len);
      return true;
    }
  }
}

void PieceCache::insert(std::uint64_t owner, std::string_view piece, std::uint64_t hash,
                        const Rank* ids, std::size_t n) {
  if (owner != owner_ || slots_.empty()) reset(owner);
  if ((used_ + 1) * 2 > slots_.size()) {
    if (slots_.size() >= kCacheMaxSlots) {
      reset(owner);  // full: start over rather than grow without bound
    } else {
      std::vector<Slot> old(slots_.size() * 2);
      old.swap(slots_);
      const std::size_t mask = slots_.size() - 1;
      for (const Slot& s : old) {
        if (!s.used) continue;
        std::size_t i = s.hash & mask;
        while (slots_[i].used) i = (i + 1) & mask;
        slots_[i] = s;
      }
    }
  }
  const std::size_t mask = slots_.size() - 1;
  std::size_t i = hash & mask;
  while (slots_[i].used) i = (i + 1) & mask;
  Slot& s = slots_[i];
  s.used = true;
  s.hash = hash;
  s.key_offset = static_cast<std::uint32_t>(keys_.size());
  s.key_len = static_cast<std::uint32_t>(piece.size());
  s.value_offset = static_cast<std::uint32_t>(values_.size());
  s.value_len = static_cast<std::uint32_t>(n);
  keys_.append(piece);
  values_.insert(values_.end(), ids, ids + n);
  ++used_;
}

Encoder::Encoder(std::vector<std::string> tokens, std::vector<SpecialToken> specials)
    : serial_(next_serial.fetch_add(1)), n_ordinary_(tokens.size()), specials_(std::move(specials)) {
  if (tokens.empty()) throw InputError("the vocabulary is empty: it needs at least the 256 byte tokens");
  if (tokens.size() >= kNoRank / 2) throw InputError("the vocabulary is too large");
  std::size_t n_vocab = tokens.size();
  for (const SpecialToken& sp : specials_) {
    if (sp.text.empty()) throw InputError("a special token is the empty string; give it some text");
    if (sp.id < tokens.size())
      throw InputError("special token '" + printable(sp.text) + "' has id " + std::to_string(sp.id) +
                       ", which an ordinary token already uses (ordinary ids are 0.." +
                       std::to_string(tokens.size() - 1) + "); give it an id >= " +
                       std::to_string(tokens.size()));
    constexpr std::size_t kMaxSpecialGap = std::size_t{1} << 20;  // ids index a table: keep it small
    if (sp.id >= tokens.size() + kMaxSpecialGap)
      throw InputError("special token '" + printable(sp.text) + "' has id " + std::to_string(sp.id) +
                       ", far beyond the " + std::to_string(tokens.size()) +
                       " ordinary tokens; special ids must be below " + std::to_string(tokens.size() + kMaxSpecialGap) +
                       " (they normally follow the ordinary ids directly)");
    n_vocab = std::max<std::size_t>(n_vocab, static_cast<std::size_t>(sp.id) + 1);
  }

  decode_offsets_.assign(n_vocab + 1, 0);
  decodable_.assign(n_vocab, false);
  std::vector<std::string_view> by_id(n_vocab);
  std::size_t total = 0;
  for (std::size_t r = 0; r < tokens.size(); ++r) {
    if (tokens[r].empty()) throw InputError("token " + std::to_string(r) + " is empty");
    by_id[r] = tokens[r];
    total += tokens[r].size();
  }
  for (const SpecialToken& sp : specials_) {
    if (decodable_[sp.id]) throw InputError("two special tokens share id " + std::to_string(sp.id));
    decodable_[sp.id] = true;
    by_id[sp.id] = sp.text;
    total += sp.text.size();
  }
  for (std::size_t r = 0; r < tokens.size(); ++r) decodable_[r] = true;
  decode_blob_.reserve(total);
  for (std::size_t id = 0; id < n_vocab; ++id) {
    decode_offsets_[id] = static_cast<std::uint32_t>(decode_blob_.size());
    decode_blob_.append(by_id[id]);
  }
  decode_offsets_[n_vocab] = static_cast<std::uint32_t>(decode_blob_.size());

  token_slots_.assign(table_capacity_for(tokens.size()), kNoRank);
  token_mask_ = token_slots_.size() - 1;
  for (Rank r = 0; r < tokens.size(); ++r) {
    const std::string_view t = tokens[r];
    std::size_t i = hash_bytes(t) & token_mask_;
    while (token_slots_[i] != kNoRank) {
      if (token_bytes(token_slots_[i]) == t)
        throw InputError("the vocabulary lists the token '" + printable(t) + "' twice (ranks " +
                         std::to_string(token_slots_[i]) + " and " + std::to_string(r) + ")");
      i = (i + 1) & token_mask_;
    }
    token_slots_[i] = r;
  }
  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    byte_ranks_[b] = rank_of(std::string_view(&c, 1));
    if (byte_ranks_[b] == kNoRank) {
      char buf[80];
      std::snprintf(buf, sizeof buf, "the vocabulary has no token for the single byte 0x%02x", b);
      throw InputError(std::string(buf) + "; a byte-level BPE vocabulary needs all 256");
    }
  }

  // (left, right) -> r for every split of token r into two tokens. A vocabulary made by merges has one such
  // split per token at least, a few more on average.
  pair_ranks_.reserve(tokens.size() * 3);
  const TokenTrie prefixes(tokens, false), suffixes(tokens, true);
  std::vector<Rank> lefts, rights;
  for (Rank r = 0; r < tokens.size(); ++r) {
    const std::string_view t = tokens[r];
    if (t.size() < 2) continue;
    prefixes.proper_parts(t, lefts);
    suffixes.proper_parts(t, rights);
    for (std::size_t k = 1; k < t.size(); ++k) {
      const Rank left = lefts[k], right = rights[t.size() - k];
      if (left != kNoRank && right != kNoRank) pair_ranks_.set(pair_key(left, right), r);
    }
  }
}

std::string_view Encoder::token_bytes(Rank id) const {
  if (id >= n_vocab()) return {};
  return std::string_view(decode_blob_).substr(decode_offsets_[id],
                                              decode_offsets_[id + 1] - decode_offsets_[id]);
}

Rank Encoder::rank_of(std::string_view bytes) const {
  const std::uint64_t h = hash_bytes(bytes);
  for (std::size_t i = h & token_mask_;; i = (i + 1) & token_mask_) {
    const Rank r = token_slots_[i];
    if (r == kNoRank) return kNoRank;
    const std::uint32_t b = decode_offsets_[r], e = decode_offsets_[r + 1];
    if (e - b == bytes.size() && std::memcmp(decode_blob_.data() + b, bytes.data(), bytes.size()) == 0)
      return r;
  }
}

void Encoder::throw_bad_id(long long id, std::size_t position) const {
  throw InputError("token id " + std::to_string(id) + " at position " + std::to_string(position) +
                   " is not in the vocabulary (valid ids: 0.." + std::to_string(n_vocab() - 1) +
                   "); were these ids made by another tokenizer?");
}

void Encoder::merge_short(std::vector<Rank>& parts, std::vector<Rank>& ranks) const {
  // ranks[k] is the rank of parts[k] + parts[k+1] (kNoRank when that is not a token).
  ranks.resize(parts.size());
  for (std::size_t k = 0; k + 1 < parts.size(); ++k) ranks[k] = pair_rank(parts[k], parts[k + 1]);
  ranks.back() = kNoRank;
  while (parts.size() > 1) {
    Rank best = kNoRank;
    std::size_t at = 0;
    for (std::size_t k = 0; k + 1 < parts.size(); ++k) {
      if (ranks[k] < best) {  // strict: the leftmost of equal ranks wins, as in tiktoken
        best = ranks[k];
        at = k;
      }
    }
    if (best == kNoRank) break;
    parts[at] = best;
    parts.erase(parts.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    ranks.erase(ranks.begin() + static_cast<std::ptrdiff_t>(at) + 1);
    ranks[at] = at + 1 < parts.size() ? pair_rank(parts[at], parts[at + 1]) : kNoRank;
    if (at > 0) ranks[at - 1] = pair_rank(parts[at - 1], parts[at]);
  }
}

void Encoder::merge_long(std::string_view piece, std::vector<Rank>& out) const {
  // The same merges as merge_short, lowest rank first and leftmost among equals, found with a min-heap of
  // (rank << 32 | position) over a linked list of parts. pair_rank_at[p] is the rank of the pair that
  // starts at part p now; an entry whose rank no longer matches is stale and skipped. Every current pair
  // has an entry, so popping in (rank, position) order replays tiktoken's loop in n log n.
  const std::size_t n = piece.size();
  if (n == 0) return;  // the final walk below starts at part 0
  if (n >= (std::size_t{1} << 32)) throw InputError("a single piece of 4 GiB or more cannot be encoded");
  constexpr std::uint32_t kEnd = ~0U;
  std::vector<Rank> id(n), pair_rank_at(n, kNoRank);
  std::vector<std::uint32_t> next(n), prev(n);
  for (std::size_t i = 0; i < n; ++i) {
    id[i] = byte_ranks_[static_cast<unsigned char>(piece[i])];
    prev[i] = i == 0 ? kEnd : static_cast<std::uint32_t>(i - 1);
    next[i] = i + 1 < n ? static_cast<std::uint32_t>(i + 1) : kEnd;
  }
  const auto key = [](Rank r, std::uint32_t pos) { return (static_cast<std::uint64_t>(r) << 32) | pos; };
  std::vector<std::uint64_t> heap;
  heap.reserve(n);
  for (std::size_t i = 0; i + 1 < n; ++i) {
    pair_rank_at[i] = pair_rank(id[i], id[i + 1]);
    if (pair_rank_at[i] != kNoRank) heap.push_back(key(pair_rank_at[i], static_cast<std::uint32_t>(i)));
  }
  const std::greater<std::uint64_t> later;
  std::make_heap(heap.begin(), heap.end(), later);
  const auto push = [&](std::uint32_t pos) {
    const Rank r = next[pos] == kEnd ? kNoRank : pair_rank(id[pos], id[next[pos]]);
    pair_rank_at[pos] = r;
    if (r != kNoRank) {
      heap.push_back(key(r, pos));
      std::push_heap(heap.begin(), heap.end(), later);
    }
  };
  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const std::uint64_t top = heap.back();
    heap.pop_back();
    const auto left = static_cast<std::uint32_t>(top & 0xFFFFFFFFu);
    const auto rank = static_cast<Rank>(top >> 32);
    if (pair_rank_at[left] != rank) continue;  // stale
    const std::uint32_t right = next[left];
    id[left] = rank;
    next[left] = next[right];
    if (next[right] != kEnd) prev[next[right]] = left;
    pair_rank_at[right] = kNoRank;
    push(left);
    if (prev[left] != kEnd) push(prev[left]);
  }
  for (std::uint32_t i = 0; i != kEnd; i = next[i]) out.push_back(id[i]);
}

void Encoder::encode_piece_uncached(std::string_view piece, std::vector<Rank>& out) const {
  if (piece.empty()) return;
  const Rank whole = rank_of(piece);
  if (whole != kNoRank) {
    out.push_back(whole);
    return;
  }
  if (piece.size() > kShortPiece) {
    merge_long(piece, out);
    return;
  }
  thread_local MergeScratch scratch;
  scratch.parts.clear();
  for (unsigned char c : piece) scratch.parts.push_back(byte_ranks_[c]);
  merge_short(scratch.parts, scratch.ranks);
  out.insert(out.end(), scratch.parts.begin(), scratch.parts.end());
}

void Encoder::encode_piece(std::string_view piece, std::vector<Rank>& out, PieceCache& cache) const {
  if (piece.size() == 1) {
    out.push_back(byte_ranks_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  if (piece.size() > kMaxCachedPiece) {
    encode_piece_uncached(piece, out);
    return;
  }
  const std::uint64_t h = hash_bytes(piece);
  for (std::size_t i = h & token_mask_;; i = (i + 1) & token_mask_) {
    const Rank r = token_slots_[i];
    if (r == kNoRank) break;
    const std::uint32_t b = decode_offsets_[r], e = decode_offsets_[r + 1];
    if (e - b == piece.size() && std::memcmp(decode_blob_.data() + b, piece.data(), piece.size()) == 0) {
      out.push_back(r);
      return;
    }
  }
  if (cache.find(serial_, piece, h, out)) return;
  const std::size_t before = out.size();
  encode_piece_uncached(piece, out);
  cache.insert(serial_, piece, h, out.data() + before, out.size() - before);
}

void Encoder::encode_ordinary(std::string_view text, std::vector<Rank>& out) const {
  thread_local PieceCache cache;
  const std::size_t needed = out.size() + text.size() / 4 + 16;  // English runs ~4.3 bytes a token
  if (out.capacity() < needed) out.reserve(std::max(needed, out.capacity() * 2));
  pretokenize(text, [&](std::size_t offset, std::size_t length) {
    encode_piece(text.substr(offset, length), out, cache);
  });
}

void Encoder::encode_with_specials(std::string_view text, const std::vector<std::size_t>& allowed,
                                   std::vector<Rank>& out) const {
  constexpr std::size_t npos = std::string_view::npos;
  // Next occurrence of each allowed special at or after `pos`, searched again only once passed.
  std::vector<std::size_t> next_at(allowed.size(), 0);
  std::vector<bool> searched(allowed.size(), false);
  std::size_t pos = 0;
  while (true) {
    std::size_t best = npos, best_len = 0;
    Rank best_id = kNoRank;
    for (std::size_t k = 0; k < allowed.size(); ++k) {
      const SpecialToken& sp = specials_.at(allowed[k]);
      if (!searched[k] || (next_at[k] != npos && next_at[k] < pos)) {
        next_at[k] = text.find(sp.text, pos);
        searched[k] = true;
      }
      const std::size_t f = next_at[k];
      if (f != npos && (f < best || (f == best && sp.text.size() > best_len))) {
        best = f;
        best_len = sp.text.size();
        best_id = sp.id;
      }
    }
    if (best == npos) {
      encode_ordinary(text.substr(pos), out);
      return;
    }
    encode_ordinary(text.substr(pos, best - pos), out);
    out.push_back(best_id);
    pos = best + best_len;
  }
}

std::size_t Encoder::memory_bytes() const {
  return decode_blob_.capacity() + decode_offsets_.capacity() * 4 + decodable_.capacity() / 8 +
         token_slots_.capacity() * 4 + sizeof byte_ranks_ + pair_ranks_.memory_bytes();
}

std::size_t utf8_length(const char* s, std::size_t n) {
  std::size_t chars = 0;
  for (std::size_t i = 0; i < n; ++i) chars += (static_cast<unsigned char>(s[i]) & 0xC0) != 0x80;
  return chars;
}

}  // namespace gpt2fast::bpe
