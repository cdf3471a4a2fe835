// Errors and results of the iomm public API.
//
// Contract: every call that changes state returns Status or Result<T> and
// lets no exception out; on error it carries a positive errno value and a
// human-readable message, and the call has had no effect (all-or-nothing).
// The exceptions: read-only queries that return a container
// (Ioas::mappings, Ioas::iova_ranges, SoftDomain::take_faults,
// iomm::counters) may throw std::bad_alloc when that container cannot be
// allocated, and so may an error whose message is composed at run time
// (naming a range, a size or a limit) while the message is built, when the
// heap is exhausted; either way the call has changed nothing. A fixed
// message never throws (an error whose message cannot be allocated keeps
// its code with an empty message), so running out of memory is ENOMEM.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <utility>
#include <variant>

#include "iomm/export.hpp"

namespace iomm {

class IOMM_API Error {
 public:
  Error(int code, std::string message) : code_(code), message_(std::move(message)) {}
  // A fixed message: never throws (see above).
  Error(int code, const char* message) noexcept : code_(code) {
    try {
      message_ = message;
    } catch (...) {  // std::bad_alloc: keep the code, drop the text
    }
  }

  // A positive errno value (EINVAL, ENOMEM, ...).
  [[nodiscard]] int code() const noexcept { return code_; }
  [[nodiscard]] const std::string& message() const noexcept { return message_; }
  // "EINVAL: message"
  [[nodiscard]] std::string describe() const;

 private:
  int code_;
  std::string message_;
};

// The symbolic name of an errno value ("EINVAL"), or its number as text.
IOMM_API const char* errno_name(int code) noexcept;

template <typename T>
class [[nodiscard]] IOMM_API Result {
 public:
  Result(T value) : v_(std::move(value)) {}      // NOLINT(google-explicit-constructor)
  Result(Error error) : v_(std::move(error)) {}  // NOLINT(google-explicit-constructor)

  [[nodiscard]] bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }

  // value() of an error, or error() of a value, is a bug in the caller: it
  // aborts (it never throws, so noexcept paths may use these).
  T& value() & noexcept { return *get<0>(v_); }
  const T& value() const& noexcept { return *get<0>(v_); }
  T&& value() && noexcept { return std::move(*get<0>(v_)); }
  T* operator->() noexcept { return get<0>(v_); }
  const T* operator->() const noexcept { return get<0>(v_); }
  T& operator*() & noexcept { return value(); }
  const T& operator*() const& noexcept { return value(); }

  [[nodiscard]] const Error& error() const& noexcept { return *get<1>(v_); }
  // Moving the error out never allocates.
  [[nodiscard]] Error&& error() && noexcept { return std::move(*get<1>(v_)); }
  // errno value of the error, or 0 on success.
  [[nodiscard]] int code() const noexcept { return ok() ? 0 : get<1>(v_)->code(); }

 private:
  template <size_t I, typename V>
  static auto* get(V& v) noexcept {
    auto* p = std::get_if<I>(&v);
    if (p == nullptr) std::abort();
    return p;
  }
  std::variant<T, Error> v_;
};

class [[nodiscard]] IOMM_API Status {
 public:
  Status() = default;
  Status(Error error)
      : error_(std::move(error)), failed_(true) {}  // NOLINT(google-explicit-constructor)

  [[nodiscard]] bool ok() const noexcept { return !failed_; }
  explicit operator bool() const noexcept { return ok(); }
  [[nodiscard]] const Error& error() const { return error_; }
  [[nodiscard]] int code() const noexcept { return failed_ ? error_.code() : 0; }

 private:
  Error error_{0, std::string()};
  bool failed_ = false;
};

}  // namespace iomm
