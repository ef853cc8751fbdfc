// Small open-addressing hash tables for the tokenizer's hot paths.
// std::unordered_map chases a pointer per lookup; these keep keys in flat arrays, which is what makes the
// per-piece vocabulary lookup and the per-pair rank lookup cheap.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <vector>

namespace gpt2fast::bpe {

inline std::uint64_t mix64(std::uint64_t x) {
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  x *= 0xd6e8feb86659fd93ULL;
  x ^= x >> 32;
  return x;
}

// Hash of a byte string, eight bytes at a time (pieces are short, so the tail matters most).
inline std::uint64_t hash_bytes(const unsigned char* p, std::size_t n) {
  std::uint64_t h = 0x9e3779b97f4a7c15ULL ^ (n * 0xff51afd7ed558ccdULL);
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    h = mix64(h ^ w) + 0x9e3779b97f4a7c15ULL;
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    std::uint64_t w = 0;
    std::memcpy(&w, p, n);
    h = mix64(h ^ w ^ (static_cast<std::uint64_t>(n) << 56));
  }
  return h;
}

inline std::uint64_t hash_bytes(std::string_view s) {
  return hash_bytes(reinterpret_cast<const unsigned char*>(s.data()), s.size());
}

inline std::size_t table_capacity_for(std::size_t n) {
  std::size_t cap = 16;
  while (cap < n * 2) cap <<= 1;
  return cap;
}

// uint64 key -> uint32 value; the all-ones key is reserved as "empty".
class U64Map {
 public:
  static constexpr std::uint64_t kEmpty = ~0ULL;
  static constexpr std::uint32_t kMissing = ~0U;

  void reserve(std::size_t n) {
    keys_.assign(table_capacity_for(n), kEmpty);
    values_.assign(keys_.size(), 0);
    mask_ = keys_.size() - 1;
    size_ = 0;
  }
  // Inserts or overwrites. The table never grows past half full because reserve() sized it.
  void set(std::uint64_t key, std::uint32_t value) {
    if (keys_.empty() || (size_ + 1) * 2 > keys_.size()) grow();
    std::size_t i = mix64(key) & mask_;
    while (keys_[i] != kEmpty && keys_[i] != key) i = (i + 1) & mask_;
    if (keys_[i] == kEmpty) ++size_;
    keys_[i] = key;
    values_[i] = value;
  }
  std::uint32_t get(std::uint64_t key) const {
    if (keys_.empty()) return kMissing;
    std::size_t i = mix64(key) & mask_;
    while (true) {
      const std::uint64_t k = keys_[i];
      if (k == key) return values_[i];
      if (k == kEmpty) return kMissing;
      i = (i + 1) & mask_;
    }
  }
  std::size_t size() const { return size_; }
  std::size_t memory_bytes() const { return keys_.capacity() * 8 + values_.capacity() * 4; }

 private:
  void grow() {
    std::vector<std::uint64_t> old_keys;
    std::vector<std::uint32_t> old_values;
    old_keys.swap(keys_);
    old_values.swap(values_);
    reserve(old_keys.empty() ? 8 : old_keys.size());
    for (std::size_t i = 0; i < old_keys.size(); ++i)
      if (old_keys[i] != kEmpty) set(old_keys[i], old_values[i]);
  }

  std::vector<std::uint64_t> keys_;
  std::vector<std::uint32_t> values_;
  std::size_t mask_ = 0;
  std::size_t size_ = 0;
};

inline std::uint64_t pair_key(std::uint32_t left, std::uint32_t right) {
  return (static_cast<std::uint64_t>(left) << 32) | right;
}

}  // namespace gpt2fast::bpe
