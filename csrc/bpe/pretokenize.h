// GPT-2's pre-tokenizer, written out by hand instead of run through a regex engine.
//
// GPT-2 splits text with
//     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (tiktoken spells the same language with possessive quantifiers). At each position the first
// alternative that matches wins, which comes down to these rules:
//   1. an apostrophe followed by s, t, m, d, ll, ve or re (ASCII lowercase) is a piece of its own;
//   2. an optional ASCII space, then a maximal run of letters, or of numbers, or of "other" characters
//      (neither letter, number nor white space); the space is taken only when such a run follows it;
//   3. a run of white space that reaches the end of the text is one piece; a run followed by something
//      else gives up its last character (which may then lead the next piece as in rule 2, or stand
//      alone when it is not a plain space).
// The whole pass is one left-to-right scan with one table lookup per character: linear in the input.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

#include "unicode_tables.h"

namespace gpt2fast::bpe {

enum CharClass : std::uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

struct ClassifiedChar {
  CharClass cls;
  std::uint32_t len;  // bytes of UTF-8
};

inline CharClass class_of_codepoint(std::uint32_t cp) {
  if (cp >= 0x110000) return kOther;
  const std::uint32_t block = unicode_tables::kStage1[cp >> unicode_tables::kBlockShift];
  return static_cast<CharClass>(
      unicode_tables::kStage2[(block << unicode_tables::kBlockShift) | (cp & 0xFF)]);
}

// Decodes the character at p (n > 0 bytes remain). Bytes that are not valid UTF-8 count as one
// "other" character each, so arbitrary input is safe; a Python str never produces them.
inline ClassifiedChar classify(const unsigned char* p, std::size_t n) {
  const unsigned char c = p[0];
  if (c < 0x80) return {static_cast<CharClass>(unicode_tables::kStage2[c]), 1};
  std::uint32_t cp;
  std::uint32_t len;
  if ((c & 0xE0) == 0xC0) {
    cp = c & 0x1F;
    len = 2;
  } else if ((c & 0xF0) == 0xE0) {
    cp = c & 0x0F;
    len = 3;
  } else if ((c & 0xF8) == 0xF0) {
    cp = c & 0x07;
    len = 4;
  } else {
    return {kOther, 1};
  }
  if (len > n) return {kOther, 1};
  for (std::uint32_t k = 1; k < len; ++k) {
    if ((p[k] & 0xC0) != 0x80) return {kOther, 1};
    cp = (cp << 6) | (p[k] & 0x3F);
  }
  return {class_of_codepoint(cp), len};
}

// Calls emit(offset, length) for each piece of `text`, in order; the pieces tile the text exactly.
template <class Emit>
void pretokenize(std::string_view text, Emit&& emit) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char c = s[i];
    if (c == '\'' && i + 1 < n) {
      const unsigned char c1 = s[i + 1];
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        emit(i, 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const unsigned char c2 = s[i + 2];
        if ((c1 == 'l' && c2 == 'l') || (c1 == 'v' && c2 == 'e') || (c1 == 'r' && c2 == 'e')) {
          emit(i, 3);
          i += 3;
          continue;
        }
      }
    }
    const std::size_t start = i;
    ClassifiedChar ch = classify(s + i, n - i);
    if (c == ' ' && i + 1 < n) {
      const ClassifiedChar next = classify(s + i + 1, n - i - 1);
      if (next.cls != kSpace) {
        i += 1;  // the space leads the run that follows
        ch = next;
      }
    }
    if (ch.cls == kSpace) {
      std::size_t j = i + ch.len;
      std::size_t last = i;  // start of the run's last character
      while (j < n) {
        const ClassifiedChar more = classify(s + j, n - j);
        if (more.cls != kSpace) break;
        last = j;
        j += more.len;
      }
      if (j == n) {
        emit(i, n - i);
        i = n;
      } else if (last > i) {
        emit(i, last - i);
        i = last;
      } else {
        emit(i, ch.len);
        i += ch.len;
      }
      continue;
    }
    std::size_t j = i + ch.len;
    while (j < n) {
      const ClassifiedChar more = classify(s + j, n - j);
      if (more.cls != ch.cls) break;
      j += more.len;
    }
    emit(start, j - start);
    i = j;
  }
}

}  // namespace gpt2fast::bpe
