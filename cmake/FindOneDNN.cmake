# Finds oneDNN's library and headers and defines OneDNN::dnnl. Debian's own
# dnnl-config.cmake insists on OpenCL, which a CPU build does not need.
find_path(OneDNN_INCLUDE_DIR oneapi/dnnl/dnnl.h HINTS ${OneDNN_ROOT} PATH_SUFFIXES include)
find_library(OneDNN_LIBRARY dnnl HINTS ${OneDNN_ROOT} PATH_SUFFIXES lib lib64)
include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(OneDNN REQUIRED_VARS OneDNN_LIBRARY OneDNN_INCLUDE_DIR)
if(OneDNN_FOUND AND NOT TARGET OneDNN::dnnl)
  add_library(OneDNN::dnnl UNKNOWN IMPORTED)
  set_target_properties(OneDNN::dnnl PROPERTIES
    IMPORTED_LOCATION ${OneDNN_LIBRARY}
    INTERFACE_INCLUDE_DIRECTORIES ${OneDNN_INCLUDE_DIR})
endif()
mark_as_advanced(OneDNN_INCLUDE_DIR OneDNN_LIBRARY)
