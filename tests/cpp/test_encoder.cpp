// Encoder with GPT-2's vocabulary: known ids, round trips, the long-piece merge against the short one and
// against a naive reference, and input errors.
#include <cstdint>
#include <string>
#include <vector>

#include "bpe/encoder.h"
#include "bpe/pretokenize.h"
#include "bpe/trainer.h"
#include "harness.h"
#include "test_util.h"

namespace {

using gpt2fast::bpe::Encoder;
using gpt2fast::bpe::InputError;
using gpt2fast::bpe::kNoRank;
using gpt2fast::bpe::Rank;
using gpt2fast::bpe::SpecialToken;
using Ids = std::vector<Rank>;

Ids encode(const Encoder& e, std::string_view text) {
  Ids ids;
  e.encode_ordinary(text, ids);
  return ids;
}

std::string decode(const Encoder& e, const Ids& ids) {
  std::string out;
  e.decode_bytes(ids.data(), ids.size(), out);
  return out;
}

// BPE as the definition states it, with nothing clever: start from single bytes and repeatedly merge the
// adjacent pair whose concatenation has the lowest rank, the leftmost one among equal ranks.
Ids reference_merge(const Encoder& e, std::string_view piece) {
  Ids parts;
  for (unsigned char c : piece) parts.push_back(e.byte_rank(c));
  while (parts.size() > 1) {
    Rank best = kNoRank;
    std::size_t at = 0;
    for (std::size_t k = 0; k + 1 < parts.size(); ++k) {
      const Rank r = e.pair_rank(parts[k], parts[k + 1]);
      if (r < best) {
        best = r;
        at = k;
      }
    }
    if (best == kNoRank) break;
    parts[at] = best;
    parts.erase(parts.begin() + static_cast<std::ptrdiff_t>(at) + 1);
  }
  return parts;
}

Ids merge_long(const Encoder& e, std::string_view piece) {
  Ids ids;
  e.merge_long(piece, ids);
  return ids;
}

Ids uncached(const Encoder& e, std::string_view piece) {
  Ids ids;
  e.encode_piece_uncached(piece, ids);
  return ids;
}

// encode_ordinary rebuilt from its parts, bypassing the per-thread piece cache.
Ids encode_uncached(const Encoder& e, std::string_view text) {
  Ids ids;
  gpt2fast::bpe::pretokenize(text, [&](std::size_t off, std::size_t len) {
    e.encode_piece_uncached(text.substr(off, len), ids);
  });
  return ids;
}

std::string random_letters(tu::Rng& rng, std::string_view alphabet, std::size_t n) {
  std::string s;
  for (std::size_t k = 0; k < n; ++k) s += alphabet[rng.between(0, alphabet.size() - 1)];
  return s;
}

// Byte tokens in natural order plus `extra` multi-byte tokens, for small hand-made vocabularies.
std::vector<std::string> bytes_plus(const std::vector<std::string>& extra) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.emplace_back(1, static_cast<char>(b));
  tokens.insert(tokens.end(), extra.begin(), extra.end());
  return tokens;
}

TEST_CASE(gpt2_vocabulary_shape) {
  const Encoder& e = tu::gpt2_encoder();
  CHECK_EQ(e.n_vocab(), std::size_t{50257});
  CHECK_EQ(e.n_ordinary(), std::size_t{50256});
  CHECK_EQ(e.specials().size(), std::size_t{1});
  CHECK_EQ(e.specials()[0].text, std::string("<|endoftext|>"));
  CHECK_EQ(e.specials()[0].id, Rank{50256});
  CHECK_EQ(e.token_bytes(50256), std::string_view("<|endoftext|>"));
  CHECK_EQ(e.token_bytes(995), std::string_view(" world"));
  CHECK_EQ(e.token_bytes(50257), std::string_view());
  CHECK_EQ(e.rank_of("Hello"), Rank{15496});
  CHECK_EQ(e.rank_of(" world"), Rank{995});
  CHECK_EQ(e.rank_of("<|endoftext|>"), kNoRank);  // specials are not ordinary tokens
  CHECK_EQ(e.rank_of("qqqqqqqqqqqqqqqqqqqq"), kNoRank);
  CHECK_EQ(e.rank_of(""), kNoRank);
  // GPT-2 puts the printable bytes first: '!' is 0, the space (after the 188 printable ones) is 220.
  CHECK_EQ(e.byte_rank('!'), Rank{0});
  CHECK_EQ(e.byte_rank(' '), Rank{220});
  CHECK_EQ(e.byte_rank('\n'), Rank{198});
  CHECK(e.memory_bytes() > e.n_vocab());
}

TEST_CASE(pair_ranks_follow_merge_list) {
  const auto& v = tu::gpt2_vocabulary();
  const Encoder& e = tu::gpt2_encoder();
  CHECK_EQ(v.merges.size(), std::size_t{50000});
  for (std::size_t i = 0; i < v.merges.size(); ++i) {
    const auto [l, r] = v.merges[i];
    if (e.pair_rank(l, r) != 256 + i) {
      tl::Context ctx("merge " + std::to_string(i));
      CHECK_EQ(e.pair_rank(l, r), static_cast<Rank>(256 + i));
    }
  }
  CHECK_EQ(e.pair_rank(e.byte_rank('q'), e.byte_rank('\x01')), kNoRank);
}

TEST_CASE(known_encodings) {
  // Ids from tiktoken 0.14's "gpt2" encoding built from these same asset files.
  const Encoder& e = tu::gpt2_encoder();
  CHECK_EQ(encode(e, "Hello world"), (Ids{15496, 995}));
  CHECK_EQ(encode(e, "I'll don't"), (Ids{40, 1183, 836, 470}));
  CHECK_EQ(encode(e, "The quick brown fox jumps over the lazy dog."),
           (Ids{464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13}));
  CHECK_EQ(encode(e, "H\u00e9llo w\u00f6rld"), (Ids{39, 2634, 18798, 266, 30570, 335}));
  CHECK_EQ(encode(e, "\u65e5\u672c\u8a9e"), (Ids{33768, 98, 17312, 105, 45739, 252}));
  CHECK_EQ(encode(e, "\U0001F642"), (Ids{8582, 25081}));
  CHECK_EQ(encode(e, std::string(20, 'a')), (Ids{24794, 24794, 24794, 24794, 24794}));
  CHECK_EQ(encode(e, "       x"), (Ids{220, 220, 220, 220, 220, 220, 2124}));
  CHECK_EQ(encode(e, ""), Ids{});
  // Twice more: the second and third runs are served by the per-thread piece cache.
  for (int k = 0; k < 2; ++k) CHECK_EQ(encode(e, "H\u00e9llo w\u00f6rld"), (Ids{39, 2634, 18798, 266, 30570, 335}));
}

TEST_CASE(encode_appends) {
  const Encoder& e = tu::gpt2_encoder();
  Ids ids{7, 8};
  e.encode_ordinary("Hello world", ids);
  CHECK_EQ(ids, (Ids{7, 8, 15496, 995}));
}

TEST_CASE(special_tokens) {
  const Encoder& e = tu::gpt2_encoder();
  const std::vector<std::size_t> allow{0}, none{};
  Ids ids;
  e.encode_with_specials("<|endoftext|>", allow, ids);
  CHECK_EQ(ids, Ids{50256});
  ids.clear();
  e.encode_with_specials("hello<|endoftext|>world", allow, ids);
  CHECK_EQ(ids, (Ids{31373, 50256, 6894}));
  CHECK_EQ(decode(e, ids), std::string("hello<|endoftext|>world"));

  ids.clear();
  e.encode_with_specials("<|endoftext|><|endoftext|>a<|endoftext|>", allow, ids);
  CHECK_EQ(ids, (Ids{50256, 50256, 64, 50256}));

  // Not allowed: the text is ordinary text, which never yields the special id.
  ids.clear();
  e.encode_with_specials("hello<|endoftext|>world", none, ids);
  CHECK_EQ(ids, encode(e, "hello<|endoftext|>world"));
  for (Rank id : ids) CHECK(id != 50256);
  CHECK_EQ(decode(e, ids), std::string("hello<|endoftext|>world"));

  // Nearly-special text stays ordinary.
  ids.clear();
  e.encode_with_specials("<|endoftext|<|endoftext>", allow, ids);
  for (Rank id : ids) CHECK(id != 50256);
}

TEST_CASE(overlapping_specials_prefer_longest) {
  const Rank base = 256;
  const Encoder e(bytes_plus({}), {SpecialToken{"<a>", base}, SpecialToken{"<a>b", base + 1},
                                   SpecialToken{"b<", base + 2}});
  CHECK_EQ(e.n_vocab(), std::size_t{259});
  Ids ids;
  e.encode_with_specials("x<a>b<a>y", {0, 1, 2}, ids);
  // At offset 1 both "<a>" and "<a>b" match: the longer wins; "<a>" at offset 5 comes next.
  CHECK_EQ(ids, (Ids{'x', base + 1, base, 'y'}));
  ids.clear();
  e.encode_with_specials("x<a>b<a>y", {0, 2}, ids);
  // "<a>" at 1 is first; then from offset 4, "b<" at 4 precedes "<a>" at 5, whose '<' it has consumed.
  CHECK_EQ(ids, (Ids{'x', base, base + 2, 'a', '>', 'y'}));
  ids.clear();
  e.encode_with_specials("x<a>b<a>y", {2}, ids);
  CHECK_EQ(ids, (Ids{'x', '<', 'a', '>', base + 2, 'a', '>', 'y'}));
  CHECK_EQ(decode(e, ids), std::string("x<a>b<a>y"));
}

TEST_CASE(round_trips_assorted_strings) {
  const Encoder& e = tu::gpt2_encoder();
  const std::vector<std::string> samples = {
      "",
      "a",
      "Hello, world! It's 2024; we're testing.",
      "  leading and trailing spaces   ",
      "tabs\tand\nnewlines\r\n\n\n",
      "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m",
      "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u4e2d\u6587\u3002",
      "\ud55c\uad6d\uc5b4 \u0420\u0443\u0441\u0441\u043a\u0438\u0439 \u0639\u0631\u0628\u064a \u05e2\u05d1\u05e8\u05d9\u05ea",
      "\U0001F642\U0001F680\U0001F468\u200d\U0001F469\u200d\U0001F467 \U0001F44D\U0001F3FD",
      std::string(5000, 'a'),
      std::string(3000, ' ') + "x",
      std::string(2000, '\n'),
      "ab" + std::string(1000, '!') + "cd",
      [] {
        std::string s;
        for (int k = 0; k < 300; ++k) s += "antidisestablishmentarianism";
        return s;
      }(),
      std::string("nul\0inside", 10),
  };
  for (const std::string& s : samples) {
    tl::Context ctx("text " + tl::show(s));
    const Ids ids = encode(e, s);
    CHECK_EQ(decode(e, ids), s);
    CHECK_EQ(ids, encode_uncached(e, s));
    for (Rank id : ids) CHECK(id < 50256);
  }
}

TEST_CASE(decode_rejects_unknown_ids) {
  const Encoder& e = tu::gpt2_encoder();
  std::string out;
  const std::vector<std::uint32_t> too_big{15496, 50257};
  CHECK_THROWS(e.decode_bytes(too_big.data(), too_big.size(), out), InputError, "token id 50257 at position 1");
  const std::vector<int> negative{995, -1};
  CHECK_THROWS(e.decode_bytes(negative.data(), negative.size(), out), InputError, "token id -1 at position 1");
  const std::vector<long long> huge{-9000000000LL};
  CHECK_THROWS(e.decode_bytes(huge.data(), huge.size(), out), InputError, "-9000000000");
  const std::vector<std::int64_t> big{4294967296LL + 995};  // must not wrap around to 995
  CHECK_THROWS(e.decode_bytes(big.data(), big.size(), out), InputError, "4294968291");
  const std::vector<std::int64_t> ok{15496, 995, 50256};
  out.clear();
  e.decode_bytes(ok.data(), ok.size(), out);
  CHECK_EQ(out, std::string("Hello world<|endoftext|>"));

  // Ids between the ordinary tokens and a special placed further up are holes, not tokens.
  const Encoder holes(bytes_plus({}), {SpecialToken{"<s>", 300}});
  CHECK_EQ(holes.n_vocab(), std::size_t{301});
  const std::vector<int> hole{280};
  CHECK_THROWS(holes.decode_bytes(hole.data(), hole.size(), out), InputError, "token id 280");
  const std::vector<int> special{300};
  out.clear();
  holes.decode_bytes(special.data(), special.size(), out);
  CHECK_EQ(out, std::string("<s>"));
}

TEST_CASE(merge_long_matches_short_path_on_random_pieces) {
  const Encoder& e = tu::gpt2_encoder();
  tu::Rng rng(2024);
  // Few, common letters, so that long merge chains and ties between equal ranks are frequent.
  const std::vector<std::string> alphabets = {"ab", "aeinrst", "etaoinshrdlu", "abcdefghijklmnopqrstuvwxyz"};
  int compared_with_short = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    const std::string& alphabet = alphabets[iter % alphabets.size()];
    std::string piece = random_letters(rng, alphabet, rng.between(2, 128));
    if (iter % 3 == 0) piece[0] = ' ';  // as pre-tokenized words are
    tl::Context ctx("piece " + tl::show(piece));
    const Ids heap = merge_long(e, piece);
    CHECK_EQ(heap, reference_merge(e, piece));
    // encode_piece_uncached returns a whole-token piece as that token without merging, so the paths
    // are comparable only for pieces that are not tokens.
    if (e.rank_of(piece) == kNoRank) {
      CHECK_EQ(heap, uncached(e, piece));
      ++compared_with_short;
    }
    CHECK_EQ(decode(e, heap), piece);
  }
  CHECK(compared_with_short > 2500);
}

TEST_CASE(merge_long_on_long_pieces) {
  const Encoder& e = tu::gpt2_encoder();
  // tiktoken encodes 10,000 'a' as 2,500 "aaaa" tokens.
  const Ids aaaa = merge_long(e, std::string(10000, 'a'));
  CHECK_EQ(aaaa, Ids(2500, 24794));
  CHECK_EQ(uncached(e, std::string(10000, 'a')), aaaa);
  CHECK_EQ(encode(e, std::string(10000, 'a')), aaaa);

  tu::Rng rng(7);
  std::string mixed;
  for (int k = 0; k < 300; ++k) mixed += "ab";
  const std::vector<std::string> pieces = {
      std::string(10000, 'a'),
      std::string(3001, 'z'),
      " " + std::string(777, 'e'),
      mixed,
      random_letters(rng, "ab", 4000),
      random_letters(rng, "etaoinshrdlu", 4000),
      random_letters(rng, "abcdefghijklmnopqrstuvwxyz", 129),
  };
  for (const std::string& piece : pieces) {
    tl::Context ctx("piece " + tl::show(piece));
    const Ids heap = merge_long(e, piece);
    CHECK_EQ(heap, reference_merge(e, piece));
    CHECK_EQ(decode(e, heap), piece);
  }
}

TEST_CASE(merge_long_degenerate_pieces) {
  const Encoder& e = tu::gpt2_encoder();
  CHECK_EQ(merge_long(e, ""), Ids{});
  CHECK_EQ(merge_long(e, "x"), Ids{e.byte_rank('x')});
  CHECK_EQ(merge_long(e, "\xff"), Ids{e.byte_rank(0xff)});
  CHECK_EQ(merge_long(e, "he"), Ids{e.rank_of("he")});
  CHECK_EQ(uncached(e, ""), Ids{});
}

TEST_CASE(random_bytes_round_trip) {
  const Encoder& e = tu::gpt2_encoder();
  tu::Rng rng(99);
  const std::vector<std::string> atoms = {"the", " the", "ing", " ", "  ", "\n", "'s", "!", "\xc3\xa9",
                                          "\xe6\x97\xa5", "\xf0\x9f\x99\x82", "\xe6\x97", "\xff", "\x80"};
  for (int iter = 0; iter < 4000; ++iter) {
    std::string s;
    const std::size_t n = rng.between(0, 48);
    for (std::size_t k = 0; k < n; ++k) {
      switch (rng.between(0, 3)) {
        case 0: s += static_cast<char>(rng.between(0, 255)); break;
        case 1: s += rng.pick(atoms); break;
        default: s += static_cast<char>(rng.between('a', 'z')); break;
      }
    }
    if (iter % 200 == 0) s += std::string(rng.between(60, 300), static_cast<char>(rng.between(0, 255)));
    const tu::ExactBytes buf(s);
    tl::Context ctx("text " + tl::show(s) + " (hex " + tu::hex(s) + ")");
    const Ids ids = encode(e, buf.view());
    CHECK_EQ(decode(e, ids), s);
    CHECK_EQ(ids, encode_uncached(e, s));
  }
}

TEST_CASE(piece_cache_is_per_encoder) {
  // The per-thread cache must not hand one encoder's ids to another: "hello" is one token for GPT-2 but
  // two here, and the alternation below would catch a stale entry.
  const Encoder& gpt2 = tu::gpt2_encoder();
  const Encoder small(bytes_plus({"he", "ll", "llo", "hello world"}), {});
  const std::string text = " hello hello hellohello xhello";
  const Ids gpt2_ids = encode_uncached(gpt2, text);
  const Ids small_ids = encode_uncached(small, text);
  CHECK(gpt2_ids != small_ids);
  for (int k = 0; k < 3; ++k) {
    CHECK_EQ(encode(gpt2, text), gpt2_ids);
    CHECK_EQ(encode(small, text), small_ids);
  }
  CHECK_EQ(encode(small, "hellohello"), (Ids{256, 258, 256, 258}));
  // A brand-new encoder at the same address as a dead one must not see the dead one's entries either.
  for (int k = 0; k < 3; ++k) {
    const Encoder a(bytes_plus({"xy"}), {});
    CHECK_EQ(encode(a, "xyxy"), (Ids{256, 256}));
  }
  for (int k = 0; k < 3; ++k) {
    const Encoder b(bytes_plus({"yx"}), {});
    CHECK_EQ(encode(b, "xyxy"), (Ids{'x', 256, 'y'}));
  }
}

TEST_CASE(constructor_rejects_bad_vocabularies) {
  CHECK_THROWS(Encoder({}, {}), InputError, "empty");
  std::vector<std::string> missing = bytes_plus({});
  missing[0x41] = "AB";  // no token for the byte 'A' any more
  CHECK_THROWS(Encoder(missing, {}), InputError, "0x41");
  CHECK_THROWS(Encoder(bytes_plus({"ab", "cd", "ab"}), {}), InputError, "twice (ranks 256 and 258)");
  CHECK_THROWS(Encoder(bytes_plus({"ab", ""}), {}), InputError, "token 257 is empty");
  CHECK_THROWS(Encoder(bytes_plus({"ab"}), {SpecialToken{"<s>", 100}}), InputError, ">= 257");
  CHECK_THROWS(Encoder(bytes_plus({}), {SpecialToken{"", 300}}), InputError, "empty string");
  CHECK_THROWS(Encoder(bytes_plus({}), {SpecialToken{"<a>", 300}, SpecialToken{"<b>", 300}}), InputError,
               "share id 300");
}

TEST_CASE(utf8_length_counts_characters) {
  using gpt2fast::bpe::utf8_length;
  const std::string s = "h\u00e9\u65e5\U0001F642";
  CHECK_EQ(utf8_length(s.data(), s.size()), std::size_t{4});
  CHECK_EQ(utf8_length("", 0), std::size_t{0});
  CHECK_EQ(utf8_length("abc", 3), std::size_t{3});
}

}  // namespace
