# Install rules and the package config that lets an embedder call
# find_package(switchyard CONFIG) and link switchyard::comm etc.
get_property(_targets GLOBAL PROPERTY SWITCHYARD_TARGETS)
install(TARGETS ${_targets} EXPORT switchyardTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
foreach(dir core kernels comm parallel moe model launch)
  install(DIRECTORY ${CMAKE_SOURCE_DIR}/${dir}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/switchyard/${dir}
    FILES_MATCHING PATTERN "*.h")
endforeach()
install(FILES ${SWITCHYARD_GENERATED_DIR}/core/config.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/switchyard/core)
install(EXPORT switchyardTargets NAMESPACE switchyard:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/switchyard)
configure_package_config_file(cmake/switchyardConfig.cmake.in
  ${CMAKE_BINARY_DIR}/switchyardConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/switchyard)
write_basic_package_version_file(${CMAKE_BINARY_DIR}/switchyardConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_BINARY_DIR}/switchyardConfig.cmake ${CMAKE_BINARY_DIR}/switchyardConfigVersion.cmake
  ${CMAKE_SOURCE_DIR}/cmake/FindOneDNN.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/switchyard)
