// Helpers shared by the C++ tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bpe/encoder.h"
#include "bpe/vocab_io.h"

#ifndef GPT2FAST_ASSETS_DIR
#error "GPT2FAST_ASSETS_DIR must name the gpt2fast/assets directory"
#endif

namespace tu {

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline std::string asset(const std::string& name) { return read_file(std::string(GPT2FAST_ASSETS_DIR) + "/" + name); }

// The GPT-2 vocabulary, parsed once per test binary.
inline const gpt2fast::bpe::Vocabulary& gpt2_vocabulary() {
  static const gpt2fast::bpe::Vocabulary v =
      gpt2fast::bpe::parse_gpt2_files(asset("encoder.json"), asset("vocab.bpe"));
  return v;
}

inline const gpt2fast::bpe::Encoder& gpt2_encoder() {
  static const std::unique_ptr<gpt2fast::bpe::Encoder> e = std::make_unique<gpt2fast::bpe::Encoder>(
      gpt2_vocabulary().tokens, gpt2_vocabulary().specials);
  return *e;
}

// A copy of some bytes in a heap block of exactly their size. std::string keeps a NUL after the data (and
// short strings live inside the object), so a one-byte overread would go unnoticed by ASan; here it cannot.
class ExactBytes {
 public:
  explicit ExactBytes(std::string_view s) : size_(s.size()), data_(new char[s.size() ? s.size() : 1]) {
    if (!s.empty()) std::memcpy(data_.get(), s.data(), s.size());
  }
  std::string_view view() const { return std::string_view(data_.get(), size_); }

 private:
  std::size_t size_;
  std::unique_ptr<char[]> data_;
};

// splitmix64: fixed seeds give the same inputs on every platform (std:: distributions do not promise that).
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi]; the modulo bias is irrelevant for test inputs.
  std::size_t between(std::size_t lo, std::size_t hi) { return lo + next() % (hi - lo + 1); }
  template <class T>
  const T& pick(const std::vector<T>& v) {
    return v[between(0, v.size() - 1)];
  }

 private:
  std::uint64_t state_;
};

inline std::string hex(std::string_view s) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

}  // namespace tu
