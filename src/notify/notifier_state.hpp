// What an IntervalNotifier holds (see include/iomm/notifier.hpp).
#pragma once

#include <memory>

#include "iomm/ioas.hpp"
#include "mem/mem_object.hpp"
#include "notify/registry.hpp"

namespace iomm::notify {

struct NotifierState {
  NotifierState(const IovaRange& r, InvalidateCallback cb) : node(r, std::move(cb)) {}

  // What the notifier watches, kept alive while it is registered.
  std::shared_ptr<Ioas> ioas;
  std::shared_ptr<mem::MemObject> object;
  Node node;
};

}  // namespace iomm::notify
