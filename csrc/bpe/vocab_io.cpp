#include "vocab_io.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <unordered_map>

#include "trainer.h"

namespace gpt2fast::bpe {
namespace {

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Minimal reader for encoder.json: one JSON object whose values are non-negative integers.
class EncoderJsonReader {
 public:
  explicit EncoderJsonReader(std::string_view s) : s_(s) {}

  std::vector<std::pair<std::string, long long>> read() {
    std::vector<std::pair<std::string, long long>> entries;
    skip_space();
    expect('{', "'{' opening the object");
    skip_space();
    if (peek() == '}') {
      ++i_;
    } else {
      while (true) {
        skip_space();
        std::string key = read_string();
        skip_space();
        expect(':', "':' after a key");
        skip_space();
        const long long value = read_integer();
        entries.emplace_back(std::move(key), value);
        skip_space();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect('}', "',' or '}' after a value");
        break;
      }
    }
    skip_space();
    if (i_ != s_.size()) fail("unexpected text after the closing '}'");
    return entries;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw InputError("encoder.json is malformed at byte " + std::to_string(i_) + ": " + what +
                     (i_ >= s_.size() ? " (the file ends there: is it truncated?)" : ""));
  }
  int peek() const { return i_ < s_.size() ? static_cast<unsigned char>(s_[i_]) : -1; }
  void skip_space() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t')) ++i_;
  }
  void expect(char c, const char* what) {
    if (peek() != static_cast<unsigned char>(c)) fail(std::string("expected ") + what);
    ++i_;
  }
  unsigned hex4() {
    if (i_ + 4 > s_.size()) fail("a \\u escape needs four hex digits");
    unsigned v = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else fail("a \\u escape needs four hex digits");
    }
    return v;
  }
  std::string read_string() {
    expect('"', "'\"' opening a key");
    std::string out;
    while (true) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character inside a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      const char e = s_[i_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          char32_t cp = hex4();
          if (cp >= 0xD800 && cp < 0xDC00) {
            if (i_ + 2 > s_.size() || s_[i_] != '\\' || s_[i_ + 1] != 'u') fail("lone surrogate escape");
            i_ += 2;
            const unsigned low = hex4();
            if (low < 0xDC00 || low >= 0xE000) fail("bad surrogate pair");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
          } else if (cp >= 0xDC00 && cp < 0xE000) {
            fail("lone surrogate escape");
          }
          append_utf8(out, cp);
          break;
        }
        default: {
          char buf[80];
          const auto b = static_cast<unsigned char>(e);
          if (b >= 0x20 && b < 0x7F) std::snprintf(buf, sizeof buf, "unknown escape \\%c", b);
          else std::snprintf(buf, sizeof buf, "unknown escape: a backslash before the byte 0x%02x", b);
          fail(buf);
        }
      }
    }
  }
  long long read_integer() {
    const std::size_t start = i_;
    long long v = 0;
    while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') {
      v = v * 10 + (s_[i_] - '0');
      if (v > (1LL << 31)) fail("token id too large");
      ++i_;
    }
    if (i_ == start) fail("expected a non-negative integer token id");
    return v;
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

const std::unordered_map<char32_t, unsigned char>& unicode_to_byte() {
  static const auto map = [] {
    std::unordered_map<char32_t, unsigned char> m;
    const auto& fwd = gpt2_byte_to_unicode();
    for (int b = 0; b < 256; ++b) m.emplace(fwd[b], static_cast<unsigned char>(b));
    return m;
  }();
  return map;
}

// Bytes of a vocabulary file quoted in an error message: at most 60 of them, valid UTF-8 kept as it is and
// everything else (invalid UTF-8, control bytes, NUL) written as \xNN, so the message survives the trip into a
// Python str whole and shows exactly what the file holds.
std::string shorten(std::string_view s) {
  std::string out;
  const std::size_t n = std::min<std::size_t>(s.size(), 60);
  for (std::size_t i = 0; i < n;) {
    const auto c = static_cast<unsigned char>(s[i]);
    const std::size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    bool valid = len > 0 && i + len <= s.size() && (len == 1 ? c >= 0x20 && c != 0x7F : c >= 0xC2 && c <= 0xF4);
    for (std::size_t k = 1; valid && k < len; ++k) valid = (static_cast<unsigned char>(s[i + k]) & 0xC0) == 0x80;
    if (valid) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
      ++i;
    }
  }
  return out + (s.size() > 60 ? "..." : "");
}

}  // namespace

std::string bytes_to_gpt2_text(std::string_view bytes) {
  std::string out;
  const auto& fwd = gpt2_byte_to_unicode();
  for (unsigned char b : bytes) append_utf8(out, fwd[b]);
  return out;
}

bool gpt2_text_to_bytes(std::string_view text, std::string& out) {
  const auto& inv = unicode_to_byte();
  out.clear();
  std::size_t i = 0;
  while (i < text.size()) {
    const auto c = static_cast<unsigned char>(text[i]);
    char32_t cp;
    std::size_t len;
    if (c < 0x80) { cp = c; len = 1; }
    else if ((c & 0xE0) == 0xC0 && i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80) { cp = ((c & 0x1F) << 6) | (text[i + 1] & 0x3F); len = 2; }
    else return false;  // GPT-2's alphabet lies below U+0800
    const auto it = inv.find(cp);
    if (it == inv.end()) return false;
    out += static_cast<char>(it->second);
    i += len;
  }
  return true;
}

Vocabulary parse_gpt2_files(std::string_view encoder_json, std::string_view vocab_bpe) {
  Vocabulary v;
  std::unordered_map<std::string, Rank> rank_of;
  for (unsigned char b : gpt2_byte_order()) {
    rank_of.emplace(std::string(1, static_cast<char>(b)), static_cast<Rank>(v.tokens.size()));
    v.tokens.emplace_back(1, static_cast<char>(b));
  }

  std::size_t line_no = 0, pos = 0;
  std::string left_bytes, right_bytes;
  bool blank_seen = false;
  while (pos < vocab_bpe.size()) {
    std::size_t end = vocab_bpe.find('\n', pos);
    if (end == std::string_view::npos) end = vocab_bpe.size();
    std::string_view line = vocab_bpe.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line_no == 1 && line.substr(0, 8) == "#version") continue;
    const auto where = [&] { return "vocab.bpe line " + std::to_string(line_no) + " ('" + shorten(line) + "'): "; };
    if (line.empty()) {
      blank_seen = true;
      continue;
    }
    if (blank_seen) throw InputError(where() + "merges continue after a blank line");
    const std::size_t space = line.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string_view::npos)
      throw InputError(where() + "expected two tokens separated by one space (is the file truncated?)");
    if (!gpt2_text_to_bytes(line.substr(0, space), left_bytes) ||
        !gpt2_text_to_bytes(line.substr(space + 1), right_bytes))
      throw InputError(where() + "uses a character outside GPT-2's byte alphabet");
    const auto l = rank_of.find(left_bytes), r = rank_of.find(right_bytes);
    if (l == rank_of.end() || r == rank_of.end())
      throw InputError(where() + "merges a token that no earlier line made");
    std::string joined = left_bytes + right_bytes;
    const Rank id = static_cast<Rank>(v.tokens.size());
    if (!rank_of.emplace(joined, id).second)
      throw InputError(where() + "makes a token that an earlier line already made");
    v.merges.emplace_back(l->second, r->second);
    v.tokens.push_back(std::move(joined));
  }

  const auto entries = EncoderJsonReader(encoder_json).read();
  std::vector<bool> covered(v.tokens.size(), false);
  std::string bytes;
  for (const auto& [name, id] : entries) {
    const bool byte_level = gpt2_text_to_bytes(name, bytes);
    if (static_cast<std::size_t>(id) < v.tokens.size()) {
      if (!byte_level || bytes != v.tokens[id])
        throw InputError("encoder.json gives id " + std::to_string(id) + " to '" + shorten(name) +
                         "' but vocab.bpe gives that id to '" + bytes_to_gpt2_text(v.tokens[id]) +
                         "': the two files are not from the same vocabulary");
      if (covered[id]) throw InputError("encoder.json lists id " + std::to_string(id) + " twice");
      covered[id] = true;
    } else {
      v.specials.push_back({name, static_cast<Rank>(id)});
    }
  }
  for (std::size_t id = 0; id < covered.size(); ++id)
    if (!covered[id])
      throw InputError("encoder.json has no entry for id " + std::to_string(id) + " ('" +
                       bytes_to_gpt2_text(v.tokens[id]) + "'), which vocab.bpe defines: is encoder.json truncated?");
  constexpr std::size_t kMaxSpecials = 1024;
  if (v.specials.size() > kMaxSpecials)
    throw InputError("encoder.json has " + std::to_string(v.specials.size()) + " entries beyond the " +
                     std::to_string(v.tokens.size()) + " tokens vocab.bpe defines (e.g. '" +
                     shorten(v.specials.front().text) + "'): is vocab.bpe truncated?");
  return v;
}

Vocabulary parse_tiktoken(std::string_view text) {
  static const auto decode_table = [] {
    std::vector<int> t(256, -1);
    const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int k = 0; k < 64; ++k) t[static_cast<unsigned char>(alphabet[k])] = k;
    return t;
  }();
  std::vector<std::pair<long long, std::string>> ranked;
  std::size_t line_no = 0, pos = 0;
  while (pos < text.size()) {
    std::size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const auto bad = [&](const std::string& what) {
      return InputError("tiktoken file line " + std::to_string(line_no) + " ('" + shorten(line) + "'): " + what);
    };
    const std::size_t space = line.find(' ');
    if (space == std::string_view::npos || space == 0) throw bad("expected '<base64 token> <rank>' (is the file truncated?)");
    const std::string_view b64 = line.substr(0, space), rank_text = line.substr(space + 1);
    if (rank_text.empty() || rank_text.size() > 9 || rank_text.find_first_not_of("0123456789") != std::string_view::npos)
      throw bad("the rank must be a non-negative integer");
    if (b64.size() % 4 != 0) throw bad("the token is not valid base64 (length not a multiple of 4)");
    std::string bytes;
    std::uint32_t acc = 0;
    int bits = 0;
    std::size_t padding = 0;
    for (std::size_t k = 0; k < b64.size(); ++k) {
      const char c = b64[k];
      if (c == '=') {
        if (k + 2 < b64.size()) throw bad("the token is not valid base64 (misplaced '=')");
        ++padding;
        continue;
      }
      if (padding) throw bad("the token is not valid base64 (data after '=')");
      const int d = decode_table[static_cast<unsigned char>(c)];
      if (d < 0) throw bad("the token is not valid base64");
      acc = (acc << 6) | static_cast<std::uint32_t>(d);
      bits += 6;
      if (bits >= 8) {
        bits -= 8;
        bytes += static_cast<char>((acc >> bits) & 0xFF);
      }
    }
    if (bytes.empty()) throw bad("the token is empty");
    ranked.emplace_back(std::stoll(std::string(rank_text)), std::move(bytes));
  }
  Vocabulary v;
  v.tokens.resize(ranked.size());
  std::vector<bool> seen(ranked.size(), false);
  for (auto& [rank, bytes] : ranked) {
    if (rank < 0 || static_cast<std::size_t>(rank) >= ranked.size())
      throw InputError("tiktoken file: rank " + std::to_string(rank) + " is out of range for " +
                       std::to_string(ranked.size()) + " tokens: ranks must run 0.." +
                       std::to_string(ranked.size() - 1) + " (is the file truncated?)");
    if (seen[rank]) throw InputError("tiktoken file: rank " + std::to_string(rank) + " appears twice");
    seen[rank] = true;
    v.tokens[rank] = std::move(bytes);
  }
  if (v.tokens.empty()) throw InputError("tiktoken file: no tokens (is the file empty?)");
  return v;
}

std::vector<std::pair<Rank, Rank>> derive_merges(const Encoder& encoder) {
  const auto& order = gpt2_byte_order();
  for (std::size_t k = 0; k < 256; ++k) {
    const std::string_view t = encoder.token_bytes(static_cast<Rank>(k));
    if (t.size() != 1 || static_cast<unsigned char>(t[0]) != order[k])
      throw InputError("GPT-2's file format fixes the first 256 ids to the bytes in GPT-2's order, and this "
                       "vocabulary differs at id " + std::to_string(k) + "; save it in tiktoken's format instead");
  }
  std::vector<std::pair<Rank, Rank>> merges;
  for (Rank r = 256; r < encoder.n_ordinary(); ++r) {
    const std::string_view t = encoder.token_bytes(r);
    bool found = false;
    for (std::size_t k = 1; k < t.size() && !found; ++k) {
      const Rank a = encoder.rank_of(t.substr(0, k)), b = encoder.rank_of(t.substr(k));
      if (a < r && b < r) {
        merges.emplace_back(a, b);
        found = true;
      }
    }
    if (!found)
      throw InputError("token " + std::to_string(r) + " ('" + bytes_to_gpt2_text(t) +
                       "') is not the join of two earlier tokens, so GPT-2's merge-list format cannot "
                       "express it; save it in tiktoken's format instead");
  }
  return merges;
}

}  // namespace gpt2fast::bpe
