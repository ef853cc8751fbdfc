#include "trainer.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <queue>
#include <thread>
#include <unordered_map>

#include "hash.h"
#include "pretokenize.h"

namespace gpt2fast::bpe {
namespace {

struct ViewHash {
  std::size_t operator()(std::string_view s) const { return static_cast<std::size_t>(hash_bytes(s)); }
};
using WordCounts = std::unordered_map<std::string_view, std::uint64_t, ViewHash>;

void count_pieces(std::string_view text, const std::vector<std::string>& split_on, WordCounts& counts) {
  std::size_t pos = 0;
  while (pos <= text.size()) {
    std::size_t cut = text.size(), cut_len = 0;
    for (const std::string& sp : split_on) {
      const std::size_t f = text.find(sp, pos);
      if (f != std::string_view::npos && (f < cut || (f == cut && sp.size() > cut_len))) {
        cut = f;
        cut_len = sp.size();
      }
    }
    const std::string_view segment = text.substr(pos, cut - pos);
    pretokenize(segment, [&](std::size_t off, std::size_t len) { ++counts[segment.substr(off, len)]; });
    if (cut_len == 0) break;
    pos = cut + cut_len;
  }
}

struct Candidate {
  std::int64_t count;
  std::uint64_t pair;
  // priority_queue keeps the largest on top: most frequent first, then the smallest pair.
  bool operator<(const Candidate& o) const { return count != o.count ? count < o.count : pair > o.pair; }
};

}  // namespace

const std::vector<unsigned char>& gpt2_byte_order() {
  static const std::vector<unsigned char> order = [] {
    std::vector<unsigned char> o;
    std::vector<bool> printable(256, false);
    for (int b = 0; b < 256; ++b)
      printable[b] = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    for (int b = 0; b < 256; ++b)
      if (printable[b]) o.push_back(static_cast<unsigned char>(b));
    for (int b = 0; b < 256; ++b)
      if (!printable[b]) o.push_back(static_cast<unsigned char>(b));
    return o;
  }();
  return order;
}

const std::vector<char32_t>& gpt2_byte_to_unicode() {
  static const std::vector<char32_t> map = [] {
    std::vector<char32_t> m(256);
    char32_t shifted = 256;
    const auto& order = gpt2_byte_order();
    for (std::size_t k = 0; k < 256; ++k) {
      const unsigned char b = order[k];
      // the first 188 bytes in the order are printable and stand for themselves
      m[b] = k < 188 ? static_cast<char32_t>(b) : shifted++;
    }
    return m;
  }();
  return map;
}

TrainResult train_bpe(const std::vector<std::string_view>& texts, std::size_t n_ordinary,
                      const std::vector<std::string>& split_on, unsigned num_threads) {
  if (n_ordinary < 256) throw InputError("a byte-level vocabulary needs at least 256 ordinary tokens");
  for (const std::string& sp : split_on)
    if (sp.empty()) throw InputError("a special token is the empty string; give it some text");

  // 1. Count the pieces, in parallel; each thread counts whole texts, then the counts are summed.
  num_threads = std::max(1u, std::min<unsigned>(num_threads, static_cast<unsigned>(texts.size())));
  std::vector<WordCounts> partial(num_threads);
  std::atomic<std::size_t> next_text{0};
  auto worker = [&](unsigned t) {
    for (std::size_t i; (i = next_text.fetch_add(1)) < texts.size();) count_pieces(texts[i], split_on, partial[t]);
  };
  if (num_threads == 1) {
    worker(0);
  } else {
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < num_threads; ++t) pool.emplace_back(worker, t);
    for (auto& th : pool) th.join();
  }
  WordCounts& all = partial[0];
  for (unsigned t = 1; t < num_threads; ++t) {
    for (const auto& [piece, c] : partial[t]) all[piece] += c;
    WordCounts().swap(partial[t]);
  }

  // 2. Words as sequences of byte tokens, in a fixed order so that nothing depends on hashing.
  std::vector<std::pair<std::string_view, std::uint64_t>> sorted(all.begin(), all.end());
  WordCounts().swap(all);
  std::sort(sorted.begin(), sorted.end());

  TrainResult result;
  const auto& order = gpt2_byte_order();
  Rank byte_id[256];
  std::unordered_map<std::string, Rank> token_index;
  for (std::size_t k = 0; k < 256; ++k) {
    byte_id[order[k]] = static_cast<Rank>(k);
    result.tokens.emplace_back(1, static_cast<char>(order[k]));
    token_index.emplace(result.tokens.back(), static_cast<Rank>(k));
  }
  std::vector<std::vector<Rank>> words;
  std::vector<std::int64_t> freq;
  words.reserve(sorted.size());
  for (const auto& [piece, c] : sorted) {
    if (piece.size() < 2) continue;  // a single byte has no pair to merge
    std::vector<Rank> w(piece.size());
    for (std::size_t i = 0; i < piece.size(); ++i) w[i] = byte_id[static_cast<unsigned char>(piece[i])];
    words.push_back(std::move(w));
    freq.push_back(static_cast<std::int64_t>(c));
  }
  sorted.clear();
  sorted.shrink_to_fit();

  // 3. Pair counts and, for each pair, the words it occurs in.
  std::unordered_map<std::uint64_t, std::int64_t> counts;
  std::unordered_map<std::uint64_t, std::vector<std::uint32_t>> where;
  for (std::uint32_t w = 0; w < words.size(); ++w) {
    const auto& s = words[w];
    for (std::size_t i = 0; i + 1 < s.size(); ++i) {
      const std::uint64_t p = pair_key(s[i], s[i + 1]);
      counts[p] += freq[w];
      auto& list = where[p];
      if (list.empty() || list.back() != w) list.push_back(w);
    }
  }
  std::priority_queue<Candidate> heap;
  for (const auto& [p, c] : counts) heap.push({c, p});

  // 4. Merge.
  std::vector<std::uint32_t> seen(words.size(), 0);
  std::uint32_t stamp = 0;
  std::vector<std::uint64_t> grown;
  std::vector<Rank> merged_word;
  while (result.tokens.size() < n_ordinary && !heap.empty()) {
    const Candidate top = heap.top();
    heap.pop();
    const auto it = counts.find(top.pair);
    const std::int64_t current = it == counts.end() ? 0 : it->second;
    if (current != top.count) {  // stale: the count fell since this entry was pushed
      if (current > 0) heap.push({current, top.pair});
      continue;
    }
    const Rank left = static_cast<Rank>(top.pair >> 32), right = static_cast<Rank>(top.pair & 0xFFFFFFFFu);
    std::string bytes = result.tokens[left] + result.tokens[right];
    Rank new_id;
    if (const auto known = token_index.find(bytes); known != token_index.end()) {
      new_id = known->second;
    } else {
      new_id = static_cast<Rank>(result.tokens.size());
      token_index.emplace(bytes, new_id);
      result.tokens.push_back(std::move(bytes));
      result.merges.emplace_back(left, right);
    }

    std::vector<std::uint32_t> affected;
    if (auto wit = where.find(top.pair); wit != where.end()) {
      affected.swap(wit->second);
      where.erase(wit);
    }
    ++stamp;
    grown.clear();
    for (const std::uint32_t w : affected) {
      if (seen[w] == stamp) continue;
      seen[w] = stamp;
      std::vector<Rank>& s = words[w];
      const std::int64_t f = freq[w];
      merged_word.clear();
      bool changed = false;
      for (std::size_t i = 0; i < s.size(); ++i) {
        if (i + 1 < s.size() && s[i] == left && s[i + 1] == right) {
          merged_word.push_back(new_id);
          ++i;
          changed = true;
        } else {
          merged_word.push_back(s[i]);
        }
      }
      if (!changed) continue;
      for (std::size_t i = 0; i + 1 < s.size(); ++i) counts[pair_key(s[i], s[i + 1])] -= f;
      for (std::size_t i = 0; i + 1 < merged_word.size(); ++i) {
        const std::uint64_t p = pair_key(merged_word[i], merged_word[i + 1]);
        counts[p] += f;
        if (merged_word[i] == new_id || merged_word[i + 1] == new_id) {
          auto& list = where[p];
          if (list.empty() || list.back() != w) list.push_back(w);
          grown.push_back(p);
        }
      }
      s.swap(merged_word);
    }
    counts.erase(top.pair);
    std::sort(grown.begin(), grown.end());
    grown.erase(std::unique(grown.begin(), grown.end()), grown.end());
    for (const std::uint64_t p : grown) {
      const std::int64_t c = counts[p];
      if (c > 0) heap.push({c, p});
    }
  }
  return result;
}

}  // namespace gpt2fast::bpe
