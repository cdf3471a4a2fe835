#include <cstring>
#include <string>

#include "iomm/result.hpp"

namespace iomm {

const char* errno_name(int code) noexcept {
  switch (code) {
    case 0:
      return "OK";
    case EPERM:
      return "EPERM";
    case ENOENT:
      return "ENOENT";
    case ESRCH:
      return "ESRCH";
    case EIO:
      return "EIO";
    case ENXIO:
      return "ENXIO";
    case E2BIG:
      return "E2BIG";
    case EBADF:
      return "EBADF";
    case EAGAIN:
      return "EAGAIN";
    case ENOMEM:
      return "ENOMEM";
    case EACCES:
      return "EACCES";
    case EFAULT:
      return "EFAULT";
    case EBUSY:
      return "EBUSY";
    case EEXIST:
      return "EEXIST";
    case ENODEV:
      return "ENODEV";
    case EINVAL:
      return "EINVAL";
    case ENOSPC:
      return "ENOSPC";
    case ENOTTY:
      return "ENOTTY";
    case EOVERFLOW:
      return "EOVERFLOW";
    case EDEADLOCK:
      return "EDEADLOCK";
    case EADDRINUSE:
      return "EADDRINUSE";
    case EOPNOTSUPP:
      return "EOPNOTSUPP";
    case EMSGSIZE:
      return "EMSGSIZE";
    default:
      return "E?";
  }
}

std::string Error::describe() const {
  std::string name = errno_name(code_);
  if (name == "E?") name = "errno " + std::to_string(code_);
  return name + ": " + message_;
}

}  // namespace iomm
