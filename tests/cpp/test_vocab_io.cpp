// Vocabulary readers: GPT-2's encoder.json + vocab.bpe, tiktoken's ranks file, merges derived back from
// an encoder, and the error each malformed input produces.
#include <algorithm>
#include <cstdio>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "bpe/encoder.h"
#include "bpe/trainer.h"
#include "bpe/vocab_io.h"
#include "harness.h"
#include "test_util.h"

namespace {

using gpt2fast::bpe::bytes_to_gpt2_text;
using gpt2fast::bpe::derive_merges;
using gpt2fast::bpe::Encoder;
using gpt2fast::bpe::gpt2_byte_order;
using gpt2fast::bpe::gpt2_text_to_bytes;
using gpt2fast::bpe::InputError;
using gpt2fast::bpe::parse_gpt2_files;
using gpt2fast::bpe::parse_tiktoken;
using gpt2fast::bpe::Rank;
using gpt2fast::bpe::Vocabulary;
using Merges = std::vector<std::pair<Rank, Rank>>;

// A JSON string literal for `s` (UTF-8). With `ascii_only`, everything outside ASCII is written as
// \u escapes, as Python's json.dumps does by default, so both spellings get parsed.
std::string json_string(std::string_view s, bool ascii_only) {
  std::string out = "\"";
  for (std::size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
      ++i;
    } else if (c < 0x80 || !ascii_only) {
      out += static_cast<char>(c);
      ++i;
    } else {
      // GPT-2's alphabet lies below U+0800, so two-byte sequences are all there is to escape.
      CHECK((c & 0xE0) == 0xC0 && i + 1 < s.size());
      const unsigned cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(s[i + 1]) & 0x3Fu);
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", cp);
      out += buf;
      i += 2;
    }
  }
  return out + "\"";
}

// encoder.json for the 256 byte tokens (in GPT-2's order) followed by `extra` entries, given as
// (GPT-2 text, id).
std::string mini_encoder_json(const std::vector<std::pair<std::string, long long>>& extra, bool ascii_only = false) {
  std::string out = "{";
  const auto& order = gpt2_byte_order();
  for (std::size_t k = 0; k < 256; ++k) {
    out += (k ? ", " : "") + json_string(bytes_to_gpt2_text(std::string(1, static_cast<char>(order[k]))), ascii_only) +
           ": " + std::to_string(k);
  }
  for (const auto& [text, id] : extra) out += ", " + json_string(text, ascii_only) + ": " + std::to_string(id);
  return out + "}";
}

// A small consistent pair of files: "he" (256), "hel" (257), and a special token (258).
const std::string kMiniBpe = "#version: 0.2\nh e\nhe l\n";
const std::vector<std::pair<std::string, long long>> kMiniEntries = {
    {"he", 256}, {"hel", 257}, {"<|endoftext|>", 258}};

std::string base64(std::string_view bytes) {
  static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) | (static_cast<unsigned char>(bytes[i + 1]) << 8) |
                       static_cast<unsigned char>(bytes[i + 2]);
    out += {alphabet[v >> 18], alphabet[(v >> 12) & 63], alphabet[(v >> 6) & 63], alphabet[v & 63]};
  }
  if (bytes.size() - i == 1) {
    const unsigned v = static_cast<unsigned char>(bytes[i]) << 16;
    out += {alphabet[v >> 18], alphabet[(v >> 12) & 63], '=', '='};
  } else if (bytes.size() - i == 2) {
    const unsigned v = (static_cast<unsigned char>(bytes[i]) << 16) | (static_cast<unsigned char>(bytes[i + 1]) << 8);
    out += {alphabet[v >> 18], alphabet[(v >> 12) & 63], alphabet[(v >> 6) & 63], '='};
  }
  return out;
}

std::string tiktoken_text(const std::vector<std::string>& tokens) {
  std::string out;
  for (std::size_t r = 0; r < tokens.size(); ++r) out += base64(tokens[r]) + " " + std::to_string(r) + "\n";
  return out;
}

// Checks that merges[i] joins two earlier tokens into tokens[256 + i].
void check_merges_build_tokens(const std::vector<std::string>& tokens, const Merges& merges) {
  CHECK_EQ(merges.size() + 256, tokens.size());
  for (std::size_t i = 0; i < merges.size(); ++i) {
    const auto [l, r] = merges[i];
    if (!(l < 256 + i && r < 256 + i && tokens[l] + tokens[r] == tokens[256 + i])) {
      tl::Context ctx("merge " + std::to_string(i));
      CHECK(l < 256 + i);
      CHECK(r < 256 + i);
      CHECK_EQ(tokens[l] + tokens[r], tokens[256 + i]);
    }
  }
}

std::vector<std::string> gpt2_ordered_bytes() {
  std::vector<std::string> tokens;
  for (unsigned char b : gpt2_byte_order()) tokens.emplace_back(1, static_cast<char>(b));
  return tokens;
}

TEST_CASE(gpt2_byte_alphabet) {
  const auto& order = gpt2_byte_order();
  CHECK_EQ(order.size(), std::size_t{256});
  CHECK_EQ(std::set<unsigned char>(order.begin(), order.end()).size(), std::size_t{256});
  CHECK_EQ(order[0], static_cast<unsigned char>('!'));
  CHECK_EQ(order[187], static_cast<unsigned char>(0xFF));  // the last printable byte
  CHECK_EQ(order[188], static_cast<unsigned char>(0x00));  // then the others from 0 up
  CHECK_EQ(order[188 + 32], static_cast<unsigned char>(' '));

  const auto& map = gpt2fast::bpe::gpt2_byte_to_unicode();
  CHECK_EQ(std::set<char32_t>(map.begin(), map.end()).size(), std::size_t{256});
  CHECK_EQ(map['A'], char32_t{'A'});
  CHECK_EQ(map[' '], char32_t{0x120});  // "Ġ"
  CHECK_EQ(map['\n'], char32_t{0x10A});  // "Ċ"
  CHECK_EQ(bytes_to_gpt2_text(" hello\n"), std::string("\u0120hello\u010a"));

  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  std::string back;
  CHECK(gpt2_text_to_bytes(bytes_to_gpt2_text(all), back));
  CHECK_EQ(back, all);
  CHECK(!gpt2_text_to_bytes("a b", back));               // a raw space is not in the alphabet
  CHECK(!gpt2_text_to_bytes("\u65e5", back));            // nor is anything from U+0800 up
  CHECK(!gpt2_text_to_bytes("\u00ad", back));            // U+00AD stands in for no byte (0xAD is Ń)
  CHECK(!gpt2_text_to_bytes("ok\xc4", back));            // truncated two-byte sequence
  CHECK(gpt2_text_to_bytes("", back));
  CHECK_EQ(back, std::string());
}

TEST_CASE(parses_gpt2_files) {
  const Vocabulary& v = tu::gpt2_vocabulary();
  CHECK_EQ(v.tokens.size(), std::size_t{50256});
  CHECK_EQ(v.merges.size(), std::size_t{50000});
  CHECK_EQ(v.specials.size(), std::size_t{1});
  CHECK_EQ(v.specials[0].text, std::string("<|endoftext|>"));
  CHECK_EQ(v.specials[0].id, Rank{50256});
  for (std::size_t k = 0; k < 256; ++k) CHECK_EQ(v.tokens[k], std::string(1, static_cast<char>(gpt2_byte_order()[k])));
  CHECK_EQ(v.tokens[256], std::string(" t"));      // the first line of vocab.bpe is "Ġ t"
  CHECK_EQ(v.tokens[15496], std::string("Hello"));
  CHECK_EQ(v.tokens[50255], std::string(" gazed"));  // and the last "Ġg azed"
  check_merges_build_tokens(v.tokens, v.merges);
}

TEST_CASE(parses_small_gpt2_files) {
  for (bool ascii_only : {false, true}) {
    const Vocabulary v = parse_gpt2_files(mini_encoder_json(kMiniEntries, ascii_only), kMiniBpe);
    CHECK_EQ(v.tokens.size(), std::size_t{258});
    CHECK_EQ(v.tokens[256], std::string("he"));
    CHECK_EQ(v.tokens[257], std::string("hel"));
    const Merges expected{{static_cast<Rank>('h' - '!'), static_cast<Rank>('e' - '!')},
                          {256, static_cast<Rank>('l' - '!')}};
    CHECK_EQ(v.merges, expected);
    CHECK_EQ(v.specials.size(), std::size_t{1});
    CHECK_EQ(v.specials[0].text, std::string("<|endoftext|>"));
    CHECK_EQ(v.specials[0].id, Rank{258});
  }
  // Windows line endings, no "#version" header, no final newline, whitespace around JSON tokens.
  const Vocabulary crlf = parse_gpt2_files(" \n" + mini_encoder_json(kMiniEntries) + "\r\n", "h e\r\nhe l");
  CHECK_EQ(crlf.tokens.size(), std::size_t{258});
  CHECK_EQ(crlf.tokens[257], std::string("hel"));
  // Trailing blank lines are fine; only the 256 bytes.
  const Vocabulary bytes_only = parse_gpt2_files(mini_encoder_json({}), "#version: 0.2\n\n\n");
  CHECK_EQ(bytes_only.tokens.size(), std::size_t{256});
  CHECK(bytes_only.merges.empty());
  // An Encoder over it works, special included.
  const Vocabulary v = parse_gpt2_files(mini_encoder_json(kMiniEntries), kMiniBpe);
  const Encoder e(v.tokens, v.specials);
  std::vector<Rank> ids;
  e.encode_with_specials("hel<|endoftext|>he", {0}, ids);
  CHECK_EQ(ids, (std::vector<Rank>{257, 258, 256}));
}

TEST_CASE(encoder_json_errors) {
  const std::string json = mini_encoder_json(kMiniEntries);
  // Every proper prefix is a truncated file, and the message says so.
  for (std::size_t cut = 0; cut < json.size(); cut += 7) {
    tl::Context ctx("cut at " + std::to_string(cut));
    CHECK_THROWS(parse_gpt2_files(json.substr(0, cut), kMiniBpe), InputError, "truncated?");
  }
  const std::string real = tu::asset("encoder.json");
  CHECK_THROWS(parse_gpt2_files(real.substr(0, real.size() / 2), tu::asset("vocab.bpe")), InputError,
               "encoder.json is malformed at byte " + std::to_string(real.size() / 2));

  const std::string bpe = "#version: 0.2\n";
  CHECK_THROWS(parse_gpt2_files(R"({"\q": 0})", bpe), InputError, "at byte 4: unknown escape \\q");
  CHECK_THROWS(parse_gpt2_files(R"({"\u12G4": 0})", bpe), InputError, "four hex digits");
  CHECK_THROWS(parse_gpt2_files(R"({"\udc00": 0})", bpe), InputError, "lone surrogate");
  CHECK_THROWS(parse_gpt2_files(R"({"\ud800x": 0})", bpe), InputError, "lone surrogate");
  CHECK_THROWS(parse_gpt2_files(R"({"\ud800\u0041": 0})", bpe), InputError, "bad surrogate pair");
  CHECK_THROWS(parse_gpt2_files("{\"a\tb\": 0}", bpe), InputError, "control character");
  CHECK_THROWS(parse_gpt2_files(R"({"a": -1})", bpe), InputError, "non-negative integer");
  CHECK_THROWS(parse_gpt2_files(R"({"a": 1.5})", bpe), InputError, "',' or '}'");
  CHECK_THROWS(parse_gpt2_files(R"({"a": 99999999999})", bpe), InputError, "too large");
  CHECK_THROWS(parse_gpt2_files(R"({"a" 0})", bpe), InputError, "':' after a key");
  CHECK_THROWS(parse_gpt2_files(R"({a: 0})", bpe), InputError, "opening a key");
  CHECK_THROWS(parse_gpt2_files(R"(["a"])", bpe), InputError, "at byte 0: expected '{'");
  CHECK_THROWS(parse_gpt2_files(json + "}", kMiniBpe), InputError, "unexpected text after the closing '}'");
}

TEST_CASE(vocab_bpe_errors) {
  const std::string json = mini_encoder_json(kMiniEntries);
  CHECK_THROWS(parse_gpt2_files(json, "#version: 0.2\nh e\nhel\n"), InputError,
               "vocab.bpe line 3 ('hel'): expected two tokens separated by one space");
  CHECK_THROWS(parse_gpt2_files(json, "#version: 0.2\nh  e\n"), InputError, "line 2");
  CHECK_THROWS(parse_gpt2_files(json, "#version: 0.2\nh e \n"), InputError, "two tokens");
  CHECK_THROWS(parse_gpt2_files(json, " h e\n"), InputError, "line 1");
  CHECK_THROWS(parse_gpt2_files(json, "h e\nhe l\nhx y\n"), InputError,
               "vocab.bpe line 3 ('hx y'): merges a token that no earlier line made");
  // A merge may only use tokens made by lines above it.
  CHECK_THROWS(parse_gpt2_files(json, "he l\nh e\n"), InputError, "line 1");
  CHECK_THROWS(parse_gpt2_files(json, "h e\nh \u65e5\n"), InputError, "line 2");
  CHECK_THROWS(parse_gpt2_files(json, "h e\nh \u65e5\n"), InputError, "outside GPT-2's byte alphabet");
  CHECK_THROWS(parse_gpt2_files(json, "h\te l\n"), InputError, "outside GPT-2's byte alphabet");
  CHECK_THROWS(parse_gpt2_files(json, "h e\nh e\n"), InputError, "line 2 ('h e'): makes a token that an earlier line");
  CHECK_THROWS(parse_gpt2_files(json, "h e\n\nhe l\n"), InputError, "line 3 ('he l'): merges continue after a blank line");
  // "#version" is a header only on the first line.
  CHECK_THROWS(parse_gpt2_files(json, "h e\n#version: 0.2\n"), InputError, "line 2");
  // Long lines are shortened in the message.
  CHECK_THROWS(parse_gpt2_files(json, "h e\n" + std::string(500, 'x') + "\n"), InputError,
               "('" + std::string(60, 'x') + "...')");
}

TEST_CASE(mismatched_gpt2_files) {
  // Ids swapped between the two files.
  CHECK_THROWS(parse_gpt2_files(mini_encoder_json({{"hel", 256}, {"he", 257}}), kMiniBpe), InputError,
               "encoder.json gives id 256 to 'hel' but vocab.bpe gives that id to 'he'");
  // encoder.json lacks a token vocab.bpe makes.
  CHECK_THROWS(parse_gpt2_files(mini_encoder_json({{"he", 256}}), kMiniBpe), InputError,
               "no entry for id 257 ('hel')");
  CHECK_THROWS(parse_gpt2_files(mini_encoder_json({{"he", 256}, {"hel", 257}, {"he", 256}}), kMiniBpe),
               InputError, "lists id 256 twice");
  // A byte token under the wrong id.
  std::string swapped = mini_encoder_json(kMiniEntries);
  const std::string bang = R"("!": 0)", quote = R"("\"": 1)";
  swapped.replace(swapped.find(bang), bang.size(), R"("!": 1)");
  swapped.replace(swapped.find(quote), quote.size(), R"("\"": 0)");
  CHECK_THROWS(parse_gpt2_files(swapped, kMiniBpe), InputError, "gives id 1 to '!'");

  const std::string json = tu::asset("encoder.json"), bpe = tu::asset("vocab.bpe");
  // The real encoder.json with a truncated vocab.bpe: 1,000 merges leave 49,001 entries unexplained.
  std::size_t cut = 0;
  for (int line = 0; line < 1001; ++line) cut = bpe.find('\n', cut) + 1;
  CHECK_THROWS(parse_gpt2_files(json, bpe.substr(0, cut)), InputError, "is vocab.bpe truncated?");
  // And the real vocab.bpe with a small encoder.json.
  CHECK_THROWS(parse_gpt2_files(mini_encoder_json({}), bpe), InputError, "no entry for id 256 ('\u0120t')");
  CHECK_THROWS(parse_gpt2_files(mini_encoder_json(kMiniEntries), bpe), InputError, "not from the same vocabulary");
}

TEST_CASE(parses_tiktoken_files) {
  const Vocabulary& gpt2 = tu::gpt2_vocabulary();
  const Vocabulary v = parse_tiktoken(tiktoken_text(gpt2.tokens));
  CHECK_EQ(v.tokens, gpt2.tokens);
  CHECK(v.specials.empty());
  CHECK(v.merges.empty());

  // Lines in any order, CRLF endings and blank lines are accepted; the ranks decide.
  const std::vector<std::string> small = {"a", "bc", std::string("\0\xff", 2), "xyz!"};
  std::string text;
  for (std::size_t r = small.size(); r-- > 0;) text += base64(small[r]) + " " + std::to_string(r) + "\r\n\n";
  CHECK_EQ(parse_tiktoken(text).tokens, small);
}

TEST_CASE(tiktoken_errors) {
  const std::string good = "YQ== 0\nYg== 1\n";  // "a", "b"
  CHECK_THROWS(parse_tiktoken(good + "Y!== 2\n"), InputError, "tiktoken file line 3 ('Y!== 2'): the token is not valid base64");
  CHECK_THROWS(parse_tiktoken(good + "YWJ 2\n"), InputError, "line 3");
  CHECK_THROWS(parse_tiktoken(good + "YWJ 2\n"), InputError, "multiple of 4");
  CHECK_THROWS(parse_tiktoken(good + "YQ=j 2\n"), InputError, "data after '='");
  CHECK_THROWS(parse_tiktoken(good + "Y=== 2\n"), InputError, "misplaced '='");
  CHECK_THROWS(parse_tiktoken(good + "==== 2\n"), InputError, "misplaced '='");
  CHECK_THROWS(parse_tiktoken(good + "YQ== x\n"), InputError, "line 3 ('YQ== x'): the rank must be a non-negative integer");
  CHECK_THROWS(parse_tiktoken(good + "YQ== -2\n"), InputError, "non-negative integer");
  CHECK_THROWS(parse_tiktoken(good + "YQ== 2 3\n"), InputError, "non-negative integer");
  CHECK_THROWS(parse_tiktoken(good + "YQ== 1234567890\n"), InputError, "non-negative integer");
  CHECK_THROWS(parse_tiktoken(good + "YQ==\n"), InputError, "line 3 ('YQ=='): expected '<base64 token> <rank>'");
  CHECK_THROWS(parse_tiktoken(good + " 2\n"), InputError, "expected '<base64 token> <rank>'");
  CHECK_THROWS(parse_tiktoken("YQ== 0\nYg== 1\nYw== 1\n"), InputError, "rank 1 appears twice");
  CHECK_THROWS(parse_tiktoken("YQ== 0\nYg== 1\nYw== 3\n"), InputError,
               "rank 3 is out of range for 3 tokens: ranks must run 0..2");
  CHECK_THROWS(parse_tiktoken("Yg== 1\n"), InputError, "rank 1 is out of range");
  CHECK_THROWS(parse_tiktoken(""), InputError, "no tokens");
  CHECK_THROWS(parse_tiktoken("\n\r\n\n"), InputError, "no tokens");
  // Parsing succeeds, but a vocabulary without all 256 bytes cannot make an Encoder.
  const Vocabulary two = parse_tiktoken(good);
  CHECK_EQ(two.tokens, (std::vector<std::string>{"a", "b"}));
  CHECK_THROWS(Encoder(two.tokens, {}), InputError, "no token for the single byte 0x00");
}

TEST_CASE(derive_merges_rebuilds_gpt2_files) {
  const Vocabulary& v = tu::gpt2_vocabulary();
  const Encoder& e = tu::gpt2_encoder();
  const Merges merges = derive_merges(e);
  check_merges_build_tokens(v.tokens, merges);
  // Written out as vocab.bpe and read back, the derived merges give the same vocabulary.
  std::string bpe = "#version: 0.2\n";
  for (const auto& [l, r] : merges) bpe += bytes_to_gpt2_text(v.tokens[l]) + " " + bytes_to_gpt2_text(v.tokens[r]) + "\n";
  const Vocabulary again = parse_gpt2_files(tu::asset("encoder.json"), bpe);
  CHECK_EQ(again.tokens, v.tokens);
  CHECK_EQ(again.merges, merges);
}

TEST_CASE(derive_merges_errors) {
  std::vector<std::string> tokens = gpt2_ordered_bytes();
  tokens.push_back("ab");
  tokens.push_back("abc");
  {
    const Encoder e(tokens, {});
    const Rank a = 'a' - '!', b = 'b' - '!', c = 'c' - '!';
    CHECK_EQ(derive_merges(e), (Merges{{a, b}, {256, c}}));
  }
  tokens.push_back("xyz");  // neither "x"+"yz" nor "xy"+"z": no earlier pair makes it
  CHECK_THROWS(derive_merges(Encoder(tokens, {})), InputError, "token 258 ('xyz') is not the join of two earlier tokens");

  std::vector<std::string> natural;
  for (int b = 0; b < 256; ++b) natural.emplace_back(1, static_cast<char>(b));
  CHECK_THROWS(derive_merges(Encoder(natural, {})), InputError, "differs at id 0");
}

}  // namespace
