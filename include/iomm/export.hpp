// Symbol visibility of the public API (C and C++).
//
// The library is built with hidden visibility; every public class and free
// function is marked IOMM_API so it is exported from the shared library.
// C entry points (vfio_compat.h) use the same macro. In C++ it is a standard
// attribute, so it can follow [[nodiscard]] on a class.
#pragma once

#if defined(__cplusplus) && defined(__GNUC__)
#define IOMM_API [[gnu::visibility("default")]]
#elif defined(__GNUC__)
#define IOMM_API __attribute__((visibility("default")))
#else
#define IOMM_API
#endif
