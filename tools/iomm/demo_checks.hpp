// What every demo scenario checks with: a step whose outcome differs from
// what the library promises throws DemoFailure, which the scenario reports
// with the step's name and turns into a non-zero exit.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include "iomm/result.hpp"

namespace iomm::cli {

class DemoFailure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename T>
T must(Result<T> result, std::string_view what) {
  if (!result) throw DemoFailure(std::string(what) + ": " + result.error().describe());
  return std::move(result).value();
}

inline void must(const Status& status, std::string_view what) {
  if (!status) throw DemoFailure(std::string(what) + ": " + status.error().describe());
}

inline void expect(bool condition, std::string_view what) {
  if (!condition) throw DemoFailure(std::string(what));
}

}  // namespace iomm::cli
