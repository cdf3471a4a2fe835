// Formatting shared by the subcommands: byte sizes for people, and a minimal
// JSON writer (flat objects and arrays are all the CLI needs).
#pragma once

#include <concepts>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace iomm::cli {

// Thread-safe description of an errno value (strerror is not thread-safe).
inline const char* errno_text(int code) noexcept {
  const char* text = strerrordesc_np(code);
  return text != nullptr ? text : "unknown error";
}

// Exact where a unit divides evenly into fewer than five digits ("64 KiB",
// "1536 MiB"), otherwise one decimal of the largest unit ("1.2 GiB").
inline std::string format_bytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes == 0) return "0";
  char text[32];
  for (size_t unit = std::size(kUnits); unit-- > 0;) {
    const uint64_t unit_bytes = 1ULL << (10 * unit);
    if (bytes % unit_bytes == 0 && bytes / unit_bytes < 10000) {
      std::snprintf(text, sizeof text, "%llu %s",
                    static_cast<unsigned long long>(bytes / unit_bytes), kUnits[unit]);
      return text;
    }
  }
  size_t unit = 0;
  while (unit + 1 < std::size(kUnits) && bytes >> (10 * (unit + 1)) != 0) ++unit;
  std::snprintf(text, sizeof text, "%.1f %s",
                static_cast<double>(bytes) / static_cast<double>(1ULL << (10 * unit)),
                kUnits[unit]);
  return text;
}

inline std::string json_string(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof escaped, "\\u%04x", static_cast<unsigned>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

// Builds one JSON object, member by member, in insertion order.
class JsonObject {
 public:
  template <std::integral T>
  JsonObject& add(std::string_view key, T value) {
    return raw(key, std::to_string(value));
  }
  JsonObject& add(std::string_view key, bool value) { return raw(key, value ? "true" : "false"); }
  JsonObject& add(std::string_view key, std::string_view value) {
    return raw(key, json_string(value));
  }
  JsonObject& add(std::string_view key, const char* value) {
    return add(key, std::string_view(value));
  }
  // null when absent.
  JsonObject& add(std::string_view key, std::optional<uint64_t> value) {
    return raw(key, value ? std::to_string(*value) : "null");
  }
  // A member whose value is already JSON (a nested object or array).
  JsonObject& raw(std::string_view key, std::string_view json) {
    if (!body_.empty()) body_ += ", ";
    body_ += json_string(key);
    body_ += ": ";
    body_ += json;
    return *this;
  }
  [[nodiscard]] std::string str() const { return "{" + body_ + "}"; }

 private:
  std::string body_;
};

// Items already in JSON; one per line when `multiline`, for long arrays.
inline std::string json_array(const std::vector<std::string>& items, bool multiline = false) {
  if (items.empty()) return "[]";
  std::string out = "[";
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += multiline ? "," : ", ";
    if (multiline) out += "\n  ";
    out += items[i];
  }
  return out + (multiline ? "\n]" : "]");
}

}  // namespace iomm::cli
