// Symbol visibility of the public API.
//
// The library is built with hidden visibility; every public class and free
// function is marked IOMM_API so it is exported from the shared library.
// C entry points (vfio_compat.h) use the same macro.
#pragma once

#if defined(__GNUC__)
#define IOMM_API __attribute__((visibility("default")))
#else
#define IOMM_API
#endif
