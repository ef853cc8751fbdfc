// The hand-written pre-tokenizer against GPT-2's regex
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// Every expected split below was produced by Python's `regex` module running that pattern
// (regex.findall(PATTERN, text)); they are not derived from the implementation.
#include <string>
#include <vector>

#include "bpe/pretokenize.h"
#include "harness.h"
#include "test_util.h"

namespace {

using gpt2fast::bpe::pretokenize;

// Splits `text`, checking on the way that the pieces are non-empty and tile it exactly. The text is
// copied to a block of exactly its size so that reading one byte past the end is an ASan error.
std::vector<std::string> split(std::string_view text) {
  const tu::ExactBytes buf(text);
  const std::string_view t = buf.view();
  std::vector<std::string> pieces;
  std::size_t expected_offset = 0;
  pretokenize(t, [&](std::size_t offset, std::size_t length) {
    CHECK_EQ(offset, expected_offset);
    CHECK(length > 0);
    CHECK(offset + length <= t.size());
    pieces.emplace_back(t.substr(offset, length));
    expected_offset = offset + length;
  });
  CHECK_EQ(expected_offset, t.size());
  return pieces;
}

using Pieces = std::vector<std::string>;

struct Case {
  std::string text;
  Pieces expected;
};

void check_cases(const std::vector<Case>& cases) {
  for (const Case& c : cases) {
    tl::Context ctx("text " + tl::show(c.text));
    CHECK_EQ(split(c.text), c.expected);
  }
}

TEST_CASE(splits_words_and_leading_spaces) {
  check_cases({
      {"Hello world", {"Hello", " world"}},
      {"Hello, world! How's it going?", {"Hello", ",", " world", "!", " How", "'s", " it", " going", "?"}},
      {"abc123def", {"abc", "123", "def"}},
      {" 123 456", {" 123", " 456"}},
      {"a, b!", {"a", ",", " b", "!"}},
      {"1,000,000", {"1", ",", "000", ",", "000"}},
      {"e.g. 3.14", {"e", ".", "g", ".", " 3", ".", "14"}},
      {"$100 -5", {"$", "100", " -", "5"}},
      {"don't!!!", {"don", "'t", "!!!"}},
  });
}

TEST_CASE(splits_contractions) {
  check_cases({
      {"I'll don't", {"I", "'ll", " don", "'t"}},
      {"we're they've I'm he'd it's", {"we", "'re", " they", "'ve", " I", "'m", " he", "'d", " it", "'s"}},
      {"x'll", {"x", "'ll"}},
      {"a'sb", {"a", "'s", "b"}},
      {"'ve'll", {"'ve", "'ll"}},
      {"'re're", {"'re", "'re"}},
      // Only lowercase ASCII suffixes are contractions.
      {"'S 'T", {"'", "S", " '", "T"}},
      {"I'LL", {"I", "'", "LL"}},
      // An apostrophe that starts no contraction joins the run of "other" characters around it.
      {"'", {"'"}},
      {"'l", {"'", "l"}},
      {"''s", {"''", "s"}},
      {"?'s", {"?'", "s"}},
      {" 's", {" '", "s"}},
      {"it's'", {"it", "'s", "'"}},
  });
}

TEST_CASE(splits_whitespace_runs) {
  check_cases({
      {"", {}},
      {" ", {" "}},
      {"   ", {"   "}},
      {"\t", {"\t"}},
      {" \t", {" \t"}},
      {" \n", {" \n"}},
      {"a  b", {"a", " ", " b"}},
      {"a \n b", {"a", " \n", " b"}},
      {"a \nb", {"a", " ", "\n", "b"}},
      {"a \tb", {"a", " ", "\t", "b"}},
      {"x\t\ty", {"x", "\t", "\t", "y"}},
      {"x  \n  y", {"x", "  \n ", " y"}},
      {"ab  \t  cd", {"ab", "  \t ", " cd"}},
      {"  hello", {" ", " hello"}},
      {"\n\nfoo", {"\n", "\n", "foo"}},
      {"a\r\nb", {"a", "\r", "\n", "b"}},
      {"\r\n", {"\r\n"}},
      {"a\nb\n", {"a", "\n", "b", "\n"}},
      {"    def f():\n        return 1\n", {"   ", " def", " f", "():", "\n       ", " return", " 1", "\n"}},
  });
}

TEST_CASE(trailing_whitespace_run_is_one_piece) {
  check_cases({
      {"hello   ", {"hello", "   "}},
      {"hello world  ", {"hello", " world", "  "}},
      {"foo\n\n", {"foo", "\n\n"}},
      {"tab\tend\t", {"tab", "\t", "end", "\t"}},
      {"A\u3000\u3000", {"A", "\u3000\u3000"}},
      {"a\u00a0\u00a0", {"a", "\u00a0\u00a0"}},
  });
}

TEST_CASE(splits_non_ascii_text) {
  check_cases({
      {"H\u00e9llo w\u00f6rld", {"H\u00e9llo", " w\u00f6rld"}},
      {"\u00e9t\u00e9 2024!", {"\u00e9t\u00e9", " 2024", "!"}},
      {"\u65e5\u672c\u8a9e \u30c6\u30ad\u30b9\u30c8", {"\u65e5\u672c\u8a9e", " \u30c6\u30ad\u30b9\u30c8"}},
      {"x \U0001F642\U0001F642 y", {"x", " \U0001F642\U0001F642", " y"}},
      // Numbers are \p{N}, not just 0-9: vulgar fractions, superscripts, Arabic-Indic digits.
      {"\u00bd \u00b2 \u0663", {"\u00bd", " \u00b2", " \u0663"}},
      // A combining mark is \p{M}: it is "other", so it splits the word.
      {"ab\u0301c", {"ab", "\u0301", "c"}},
      {"x\u200by", {"x", "\u200b", "y"}},
      // Non-ASCII white space is \s, but only the ASCII space may lead a word.
      {"a\u3000b", {"a", "\u3000", "b"}},
      {"x\u3000\u3000y", {"x", "\u3000", "\u3000", "y"}},
      {"a \u00a0b", {"a", " ", "\u00a0", "b"}},
      {" \u3000x", {" ", "\u3000", "x"}},
      {"a\u0085\u0085b", {"a", "\u0085", "\u0085", "b"}},
      {"x \u2028\u2028 y", {"x", " \u2028\u2028", " y"}},
  });
}

TEST_CASE(long_runs) {
  // A run of n white-space characters before a word gives up its last one to the word.
  const std::string spaces(100000, ' ');
  CHECK_EQ(split(spaces + "x"), (Pieces{std::string(99999, ' '), " x"}));
  const std::string newlines(100000, '\n');
  CHECK_EQ(split(newlines + "x"), (Pieces{std::string(99999, '\n'), "\n", "x"}));
  CHECK_EQ(split(spaces), (Pieces{spaces}));
  const std::string letters(200000, 'a');
  CHECK_EQ(split(letters), (Pieces{letters}));
  CHECK_EQ(split(" " + letters + "1"), (Pieces{" " + letters, "1"}));
}

TEST_CASE(character_classes) {
  using namespace gpt2fast::bpe;
  CHECK_EQ(class_of_codepoint('a'), kLetter);
  CHECK_EQ(class_of_codepoint('Z'), kLetter);
  CHECK_EQ(class_of_codepoint('7'), kNumber);
  CHECK_EQ(class_of_codepoint(' '), kSpace);
  CHECK_EQ(class_of_codepoint('\n'), kSpace);
  CHECK_EQ(class_of_codepoint('\''), kOther);
  CHECK_EQ(class_of_codepoint(0x00E9), kLetter);   // é
  CHECK_EQ(class_of_codepoint(0x65E5), kLetter);   // 日
  CHECK_EQ(class_of_codepoint(0x0663), kNumber);   // Arabic-Indic three
  CHECK_EQ(class_of_codepoint(0x3000), kSpace);    // ideographic space
  CHECK_EQ(class_of_codepoint(0x0301), kOther);    // combining acute
  CHECK_EQ(class_of_codepoint(0x1F642), kOther);   // emoji
  CHECK_EQ(class_of_codepoint(0x10FFFF), kOther);
  CHECK_EQ(class_of_codepoint(0x110000), kOther);  // beyond Unicode
  CHECK_EQ(class_of_codepoint(0xFFFFFFFFu), kOther);
}

TEST_CASE(invalid_utf8_is_split_byte_by_byte_as_other) {
  // Bytes that do not form a valid character count as one "other" character each, so they join runs
  // of punctuation and a preceding space, and a valid character after them is read normally.
  check_cases({
      {"a\xff" "b", {"a", "\xff", "b"}},
      {" \xff\xfe", {" \xff\xfe"}},
      {"\x80\x80", {"\x80\x80"}},
      {"!\xc3", {"!\xc3"}},
      {"x\xe6\x97", {"x", "\xe6\x97"}},                       // 日 cut after two of its three bytes
      {"ok \xf0\x9f\x99", {"ok", " \xf0\x9f\x99"}},           // 🙂 cut after three of four bytes
      {"\xe6\x97\xa5\xe6\x97", {"\xe6\x97\xa5", "\xe6\x97"}},  // a whole 日, then a truncated one
      {"\xc3" "a", {"\xc3", "a"}},                            // lead byte followed by a non-continuation
      {"\xc3\xa9\xc3", {"\xc3\xa9", "\xc3"}},                 // é then a lone lead byte at the very end
  });
}

TEST_CASE(malformed_utf8_tiles_input) {
  const std::vector<std::string> samples = {
      "\xe6", "\xe6\x97", "\xf0", "\xf0\x9f", "\xf0\x9f\x99", "\xff", "\xfe\xff", "\xc0\xaf",
      "\xe0\x80\xaf", "\xed\xa0\x80", "\xed\xbf\xbf", "\xf4\x90\x80\x80", "\xf7\xbf\xbf\xbf",
      "\xf8\x88\x80\x80\x80", "\x80", "\xbf\xbf", " \xe6", "'\xe6", "'l\xe6", "a\xe6\x97\xe6\x97\xe6",
  };
  for (const std::string& s : samples) {
    for (const std::string& prefix : {std::string(), std::string("x"), std::string(" "), std::string("  ")}) {
      tl::Context ctx("text " + tl::show(prefix + s));
      split(prefix + s);  // the tiling checks are inside
      split(prefix + s + "z");
    }
  }
}

TEST_CASE(random_bytes_tile_input) {
  // Mostly the characters the rules care about, plus arbitrary bytes, so that every branch meets
  // truncated and invalid sequences at every position, including the very end of the buffer.
  const std::vector<std::string> atoms = {
      "a", "Z", "1", " ", " ", "  ", "\t", "\n", "\r", "'", "'s", "'ll", "'re", "'v", "!", ".", "\xc3\xa9",
      "\xe6\x97\xa5", "\xe3\x80\x80", "\xc2\xa0", "\xf0\x9f\x99\x82", "\xe6\x97", "\xf0\x9f", "\xff", "\x80",
      "\xc3", "\xed\xa0\x80"};
  tu::Rng rng(12345);
  for (int iter = 0; iter < 20000; ++iter) {
    std::string s;
    const std::size_t n = rng.between(0, 24);
    for (std::size_t k = 0; k < n; ++k) {
      if (rng.between(0, 4) == 0)
        s += static_cast<char>(rng.between(0, 255));
      else
        s += rng.pick(atoms);
    }
    tl::Context ctx("text " + tl::show(s));
    const Pieces pieces = split(s);
    std::string joined;
    for (const std::string& p : pieces) joined += p;
    CHECK_EQ(joined, s);
  }
}

}  // namespace
