// train_bpe: structure of the result, determinism across thread counts, agreement with a naive trainer,
// special tokens as hard boundaries, and an Encoder built from what it learns.
#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bpe/encoder.h"
#include "bpe/pretokenize.h"
#include "bpe/trainer.h"
#include "bpe/vocab_io.h"
#include "harness.h"
#include "test_util.h"

namespace {

using gpt2fast::bpe::Encoder;
using gpt2fast::bpe::gpt2_byte_order;
using gpt2fast::bpe::InputError;
using gpt2fast::bpe::kNoRank;
using gpt2fast::bpe::Rank;
using gpt2fast::bpe::SpecialToken;
using gpt2fast::bpe::train_bpe;
using gpt2fast::bpe::TrainResult;
using Merges = std::vector<std::pair<Rank, Rank>>;

const std::string kEot = "<|endoftext|>";

std::vector<std::string_view> views(const std::vector<std::string>& texts) {
  return std::vector<std::string_view>(texts.begin(), texts.end());
}

TrainResult train(const std::vector<std::string>& texts, std::size_t n, const std::vector<std::string>& split_on = {},
                  unsigned threads = 1) {
  return train_bpe(views(texts), n, split_on, threads);
}

// Documents of short English-like sentences. The vocabulary avoids "endof" and '|' so that any learned
// token containing them can only come from the special token's text.
std::vector<std::string> make_documents(std::uint64_t seed, std::size_t count) {
  static const std::vector<std::string> words = {
      "the", "the", "the", "a", "cat", "sat", "on", "mat", "dog", "ran", "to", "and", "then", "it", "was",
      "happy", "tired", "very", "quickly", "slowly", "home", "garden", "there", "where", "they", "went",
      "text", "end", "of", "offer", "ending", "don't", "it's", "42", "2024", "caf\u00e9", "na\u00efve",
      "\u65e5\u672c", "\U0001F642"};
  tu::Rng rng(seed);
  std::vector<std::string> docs;
  for (std::size_t d = 0; d < count; ++d) {
    std::string doc;
    const std::size_t sentences = rng.between(1, 4);
    for (std::size_t s = 0; s < sentences; ++s) {
      const std::size_t n = rng.between(3, 12);
      for (std::size_t k = 0; k < n; ++k) {
        std::string w = rng.pick(words);
        if (k == 0) w[0] = static_cast<char>(w[0] >= 'a' && w[0] <= 'z' ? w[0] - 32 : w[0]);
        doc += (k ? " " : "") + w;
      }
      doc += rng.between(0, 3) == 0 ? "!\n" : ". ";
    }
    docs.push_back(std::move(doc));
  }
  return docs;
}

std::string join(const std::vector<std::string>& docs, const std::string& sep) {
  std::string out;
  for (std::size_t i = 0; i < docs.size(); ++i) out += (i ? sep : "") + docs[i];
  return out;
}

void check_structure(const TrainResult& r, std::size_t n_ordinary) {
  CHECK(r.tokens.size() <= n_ordinary);
  CHECK(r.tokens.size() >= 256);
  CHECK_EQ(r.merges.size() + 256, r.tokens.size());
  const auto& order = gpt2_byte_order();
  for (std::size_t k = 0; k < 256; ++k) CHECK_EQ(r.tokens[k], std::string(1, static_cast<char>(order[k])));
  for (std::size_t i = 0; i < r.merges.size(); ++i) {
    const auto [l, rt] = r.merges[i];
    tl::Context ctx("merge " + std::to_string(i));
    CHECK(l < 256 + i);
    CHECK(rt < 256 + i);
    CHECK_EQ(r.tokens[l] + r.tokens[rt], r.tokens[256 + i]);
  }
  CHECK_EQ(std::set<std::string>(r.tokens.begin(), r.tokens.end()).size(), r.tokens.size());
}

// The training rule as stated, recounting everything at every step: merge the most frequent adjacent pair,
// ties to the smallest (left id, right id); a pair whose bytes are already a token merges into it.
TrainResult naive_train(const std::vector<std::string>& texts, std::size_t n_ordinary) {
  std::map<std::string, std::int64_t> piece_counts;
  for (const std::string& t : texts)
    gpt2fast::bpe::pretokenize(t, [&](std::size_t off, std::size_t len) { ++piece_counts[t.substr(off, len)]; });
  TrainResult r;
  std::map<std::string, Rank> index;
  Rank byte_id[256];
  for (unsigned char b : gpt2_byte_order()) {
    byte_id[b] = static_cast<Rank>(r.tokens.size());
    index[std::string(1, static_cast<char>(b))] = byte_id[b];
    r.tokens.emplace_back(1, static_cast<char>(b));
  }
  std::vector<std::pair<std::vector<Rank>, std::int64_t>> words;
  for (const auto& [piece, c] : piece_counts) {
    std::vector<Rank> w;
    for (unsigned char ch : piece) w.push_back(byte_id[ch]);
    words.emplace_back(std::move(w), c);
  }
  while (r.tokens.size() < n_ordinary) {
    std::map<std::pair<Rank, Rank>, std::int64_t> pairs;
    for (const auto& [w, c] : words)
      for (std::size_t i = 0; i + 1 < w.size(); ++i) pairs[{w[i], w[i + 1]}] += c;
    if (pairs.empty()) break;
    auto best = pairs.begin();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (it->second > best->second) best = it;  // strict: the smallest pair wins a tie
    const auto [left, right] = best->first;
    const std::string bytes = r.tokens[left] + r.tokens[right];
    Rank id;
    if (const auto known = index.find(bytes); known != index.end()) {
      id = known->second;
    } else {
      id = static_cast<Rank>(r.tokens.size());
      index[bytes] = id;
      r.tokens.push_back(bytes);
      r.merges.emplace_back(left, right);
    }
    for (auto& [w, c] : words) {
      std::vector<Rank> out;
      for (std::size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == left && w[i + 1] == right) {
          out.push_back(id);
          ++i;
        } else {
          out.push_back(w[i]);
        }
      }
      w.swap(out);
    }
  }
  return r;
}

TEST_CASE(rejects_bad_arguments) {
  const std::vector<std::string> texts = {"hello world"};
  CHECK_THROWS(train(texts, 255), InputError, "at least 256");
  CHECK_THROWS(train(texts, 0), InputError, "at least 256");
  CHECK_THROWS(train(texts, 300, {kEot, ""}), InputError, "empty string");
}

TEST_CASE(degenerate_inputs) {
  const TrainResult none = train({}, 1000);
  check_structure(none, 1000);
  CHECK_EQ(none.tokens.size(), std::size_t{256});

  const TrainResult bytes_only = train(make_documents(1, 20), 256);
  CHECK_EQ(bytes_only.tokens.size(), std::size_t{256});

  // One pair in the whole corpus: one merge, then nothing left to merge.
  const TrainResult ab = train({"ab"}, 1000);
  check_structure(ab, 1000);
  CHECK_EQ(ab.tokens.size(), std::size_t{257});
  CHECK_EQ(ab.tokens[256], std::string("ab"));

  // Only single-byte pieces (a lone newline before a letter stands alone): nothing to learn.
  CHECK_EQ(train({"a\nb\nc", "", kEot, "x" + kEot + "y"}, 1000, {kEot}).tokens.size(), std::size_t{256});
}

TEST_CASE(merges_most_frequent_then_smallest_pair) {
  // Pieces: "ab" once, " ab" twice, " cd" once. (a,b) occurs three times; then (' ', ab) twice; then
  // (' ', c) and (c, d) tie at one, and (c, d) = (66, 67) is smaller than (' ', c) = (220, 66).
  const TrainResult r = train({"ab ab ab cd"}, 1000);
  check_structure(r, 1000);
  CHECK_EQ(std::vector<std::string>(r.tokens.begin() + 256, r.tokens.end()),
           (std::vector<std::string>{"ab", " ab", "cd", " cd"}));
  const Rank a = 'a' - '!', b = 'b' - '!', c = 'c' - '!', d = 'd' - '!', space = 220;
  CHECK_EQ(r.merges, (Merges{{a, b}, {space, 256}, {c, d}, {space, 258}}));
  // The vocabulary size caps the merges.
  const TrainResult capped = train({"ab ab ab cd"}, 258);
  CHECK_EQ(std::vector<std::string>(capped.tokens.begin() + 256, capped.tokens.end()),
           (std::vector<std::string>{"ab", " ab"}));
}

TEST_CASE(respects_vocabulary_size) {
  const std::vector<std::string> docs = make_documents(2, 200);
  for (std::size_t n : {256u, 257u, 300u, 400u}) {
    tl::Context ctx("n_ordinary " + std::to_string(n));
    const TrainResult r = train(docs, n);
    check_structure(r, n);
    CHECK_EQ(r.tokens.size(), n);  // the corpus has far more than 144 distinct pairs to merge
  }
}

TEST_CASE(same_result_for_any_thread_count) {
  const std::vector<std::string> docs = make_documents(3, 300);
  const TrainResult one = train(docs, 500, {kEot}, 1);
  check_structure(one, 500);
  for (unsigned threads : {0u, 2u, 3u, 8u}) {
    tl::Context ctx("threads " + std::to_string(threads));
    const TrainResult r = train(docs, 500, {kEot}, threads);
    CHECK_EQ(r.tokens, one.tokens);
    CHECK_EQ(r.merges, one.merges);
  }
  // Cutting the same text into a different number of texts changes nothing either.
  std::vector<std::string> halves = {join(std::vector<std::string>(docs.begin(), docs.begin() + 150), kEot),
                                     join(std::vector<std::string>(docs.begin() + 150, docs.end()), kEot)};
  const TrainResult two = train(halves, 500, {kEot}, 2);
  CHECK_EQ(two.tokens, one.tokens);
  CHECK_EQ(two.merges, one.merges);
}

TEST_CASE(matches_naive_trainer) {
  tu::Rng rng(77);
  for (int iter = 0; iter < 40; ++iter) {
    // Words over two or three letters repeat a lot, so long merge chains and count ties are common.
    const std::string alphabet = iter % 2 ? "ab" : "abc";
    std::vector<std::string> texts;
    const std::size_t n_texts = rng.between(1, 4);
    for (std::size_t t = 0; t < n_texts; ++t) {
      std::string text;
      const std::size_t n_words = rng.between(1, 60);
      for (std::size_t w = 0; w < n_words; ++w) {
        if (w) text += rng.between(0, 5) == 0 ? "." : " ";
        const std::size_t len = rng.between(1, 9);
        for (std::size_t k = 0; k < len; ++k) text += alphabet[rng.between(0, alphabet.size() - 1)];
      }
      texts.push_back(std::move(text));
    }
    const std::size_t n = 256 + rng.between(1, 80);
    tl::Context ctx("corpus " + tl::show(texts) + ", n_ordinary " + std::to_string(n));
    const TrainResult expected = naive_train(texts, n);
    const TrainResult got = train(texts, n, {}, static_cast<unsigned>(rng.between(1, 3)));
    check_structure(got, n);
    CHECK_EQ(got.tokens, expected.tokens);
    CHECK_EQ(got.merges, expected.merges);
  }
}

TEST_CASE(special_tokens_are_never_learned_across) {
  const std::vector<std::string> docs = make_documents(4, 300);
  const std::vector<std::string> texts = {join(docs, kEot) + kEot, kEot + kEot + "The end." + kEot};
  const TrainResult r = train(texts, 700, {kEot}, 2);
  check_structure(r, 700);
  for (std::size_t id = 256; id < r.tokens.size(); ++id) {
    const std::string& t = r.tokens[id];
    tl::Context ctx("token " + std::to_string(id) + " " + tl::show(t));
    CHECK(t.find("endof") == std::string::npos);
    CHECK(t.find('|') == std::string::npos);
    CHECK(t.find('<') == std::string::npos);
  }
  // Cutting at the special is the same as training on the pieces between the specials.
  std::vector<std::string> pieces = docs;
  pieces.push_back("The end.");
  const TrainResult apart = train(pieces, 700);
  CHECK_EQ(r.tokens, apart.tokens);
  CHECK_EQ(r.merges, apart.merges);

  // Control: without split_on the special's text is ordinary text and its parts are learned, so the
  // checks above can fail.
  const TrainResult unsplit = train(texts, 700, {}, 2);
  bool learned_special_text = false;
  for (std::size_t id = 256; id < unsplit.tokens.size(); ++id)
    learned_special_text |= unsplit.tokens[id].find("endof") != std::string::npos;
  CHECK(learned_special_text);
}

TEST_CASE(longest_special_wins_at_same_position) {
  // "<|end" is a prefix of "<|endoftext|>": were it preferred, "oftext" would be left behind and learned.
  std::vector<std::string> docs, texts;
  for (int k = 0; k < 50; ++k) docs.push_back("hello world " + std::to_string(k));
  texts.push_back(join(docs, kEot));
  const TrainResult r = train(texts, 400, {"<|end", kEot});
  const TrainResult apart = train(docs, 400);
  CHECK_EQ(r.tokens, apart.tokens);
  for (const std::string& t : r.tokens) CHECK(t.find("oftext") == std::string::npos);
  // Shorter specials still cut where the longer one does not match.
  const TrainResult short_cut = train({"ab<|endab<|endab"}, 300, {"<|end", kEot});
  CHECK_EQ(short_cut.tokens, train({"ab", "ab", "ab"}, 300).tokens);
}

TEST_CASE(encoder_from_trained_vocabulary) {
  const std::vector<std::string> docs = make_documents(5, 400);
  const std::string text = join(docs, kEot);
  const TrainResult r = train({text}, 800, {kEot}, 2);
  check_structure(r, 800);
  const Rank eot = static_cast<Rank>(r.tokens.size());
  const Encoder e(r.tokens, {SpecialToken{kEot, eot}});

  std::vector<Rank> ids;
  e.encode_with_specials(text, {0}, ids);
  std::string back;
  e.decode_bytes(ids.data(), ids.size(), back);
  CHECK_EQ(back, text);
  std::size_t specials = 0;
  for (Rank id : ids) specials += id == eot;
  CHECK_EQ(specials, docs.size() - 1);
  // The frequent words were learned whole, so the text compresses well.
  CHECK(ids.size() * 3 < text.size());
  CHECK(e.rank_of(" the") != kNoRank);
  std::vector<Rank> the;
  e.encode_ordinary(" the", the);
  CHECK_EQ(the, std::vector<Rank>{e.rank_of(" the")});

  // Each document alone round-trips too, and text the trainer never saw still encodes losslessly.
  for (const std::string& doc : {docs[0], docs[1], std::string("Zebras \xff\xfe quarrel \u00e9\u00e9\u00e9!!")}) {
    ids.clear();
    e.encode_ordinary(doc, ids);
    back.clear();
    e.decode_bytes(ids.data(), ids.size(), back);
    CHECK_EQ(back, doc);
  }

  // A trained vocabulary keeps GPT-2's byte order, so its merges can be written in GPT-2's format.
  const Merges derived = gpt2fast::bpe::derive_merges(e);
  CHECK_EQ(derived.size(), r.merges.size());
  for (std::size_t i = 0; i < derived.size(); ++i)
    CHECK_EQ(r.tokens[derived[i].first] + r.tokens[derived[i].second], r.tokens[256 + i]);
}

TEST_CASE(arbitrary_bytes) {
  // Invalid UTF-8 and NULs are just bytes to the trainer.
  tu::Rng rng(31337);
  std::vector<std::string> texts;
  for (int t = 0; t < 30; ++t) {
    std::string s;
    const std::size_t n = rng.between(0, 400);
    for (std::size_t k = 0; k < n; ++k)
      s += static_cast<char>(rng.between(0, 2) ? rng.between(0, 255) : rng.between('a', 'd'));
    texts.push_back(std::move(s));
  }
  const TrainResult r = train(texts, 600, {kEot}, 2);
  check_structure(r, 600);
  const TrainResult expected = naive_train(texts, 600);
  CHECK_EQ(r.tokens, expected.tokens);
  const Encoder e(r.tokens, {});
  for (const std::string& s : texts) {
    std::vector<Rank> ids;
    e.encode_ordinary(s, ids);
    std::string back;
    e.decode_bytes(ids.data(), ids.size(), back);
    CHECK_EQ(back, s);
  }
}

}  // namespace
