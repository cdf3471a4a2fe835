# Installation and packaging: headers, libiomm.so.N / libiomm.a, the CMake
# package (find_package(iomm CONFIG) -> iomm::iomm), iomm.pc, the CLI, and
# CPack's Debian packages (libiomm0, libiomm-dev, iomm-tools).
include(CMakePackageConfigHelpers)

set(IOMM_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/iomm)

install(TARGETS iomm EXPORT iommTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime
    NAMELINK_COMPONENT development)
install(TARGETS iomm_static EXPORT iommStaticTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT development)
install(DIRECTORY include/iomm DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT development)
install(FILES ${PROJECT_BINARY_DIR}/include/iomm/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/iomm COMPONENT development)
if(TARGET iomm-cli)
  install(TARGETS iomm-cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT tools)
endif()

install(EXPORT iommTargets NAMESPACE iomm:: DESTINATION ${IOMM_CMAKE_DIR}
  COMPONENT development)
install(EXPORT iommStaticTargets NAMESPACE iomm:: DESTINATION ${IOMM_CMAKE_DIR}
  COMPONENT development)
configure_package_config_file(cmake/iommConfig.cmake.in
  ${PROJECT_BINARY_DIR}/iommConfig.cmake INSTALL_DESTINATION ${IOMM_CMAKE_DIR})
# 0.x releases make no compatibility promise between minor versions.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/iommConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/iommConfig.cmake ${PROJECT_BINARY_DIR}/iommConfigVersion.cmake
  DESTINATION ${IOMM_CMAKE_DIR} COMPONENT development)

# iomm.pc finds its prefix relative to itself, so the same file works under
# any install prefix and in an unpacked .deb.
file(RELATIVE_PATH IOMM_PC_TO_PREFIX /prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /prefix)
configure_file(cmake/iomm.pc.in ${PROJECT_BINARY_DIR}/iomm.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/iomm.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig
  COMPONENT development)

# CPack: `cpack -G DEB` in the build directory. One package per component,
# named as Debian names library packages.
set(CPACK_PACKAGE_NAME iomm)
set(CPACK_PACKAGE_VENDOR "iomm")
set(CPACK_PACKAGE_CONTACT "iomm maintainers <iomm@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
  "User-space I/O memory management: IOAS, software IOMMU domains, VFIO type1 over them")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_COMPONENTS_ALL runtime development tools)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION libs)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# A shlibs file and an ldconfig trigger, so the multiarch directory is found.
set(CPACK_DEBIAN_PACKAGE_GENERATE_SHLIBS ON)
set(CPACK_DEBIAN_ENABLE_COMPONENT_DEPENDS ON)
set(CPACK_DEBIAN_RUNTIME_PACKAGE_NAME libiomm${PROJECT_VERSION_MAJOR})
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_NAME libiomm-dev)
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_SECTION libdevel)
# iomm.pc names liburcu-bp, and libiomm.a needs it to link.
set(CPACK_DEBIAN_DEVELOPMENT_PACKAGE_DEPENDS "liburcu-dev")
set(CPACK_DEBIAN_TOOLS_PACKAGE_NAME iomm-tools)
set(CPACK_DEBIAN_TOOLS_PACKAGE_SECTION utils)
# dpkg-shlibdeps cannot resolve libiomm.so.0 (not installed while
# packaging); the tool's other libraries come through libiomm0's dependencies.
set(CPACK_DEBIAN_TOOLS_PACKAGE_SHLIBDEPS OFF)
set(CPACK_COMPONENT_DEVELOPMENT_DEPENDS runtime)
set(CPACK_COMPONENT_TOOLS_DEPENDS runtime)
include(CPack)
