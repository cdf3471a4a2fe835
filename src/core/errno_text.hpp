// Thread-safe description of an errno value (strerror is not thread-safe).
#pragma once

#include <cstring>

namespace iomm {

inline const char* errno_text(int code) noexcept {
  const char* text = strerrordesc_np(code);
  return text != nullptr ? text : "unknown error";
}

}  // namespace iomm
