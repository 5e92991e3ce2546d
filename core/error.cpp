#include "core/error.h"

#include <cstring>

namespace switchyard::detail {

std::string check_location(const char* file, int line) {
  // Print the path from the project's top folder, not the build machine's absolute path.
  const char* shown = file;
  for (const char* top : {"/core/", "/kernels/", "/comm/", "/parallel/", "/launch/", "/tests/", "/bench/"}) {
    if (const char* at = std::strstr(file, top)) {
      shown = at + 1;
      break;
    }
  }
  return make_string(shown, ":", line);
}

}  // namespace switchyard::detail

namespace switchyard {

std::exception_ptr with_context(std::exception_ptr error, const std::string& prefix) {
  try {
    std::rethrow_exception(error);
  } catch (const TimeoutError& e) {
    return std::make_exception_ptr(TimeoutError(prefix + e.what()));
  } catch (const IoError& e) {
    return std::make_exception_ptr(IoError(prefix + e.what()));
  } catch (const NotSupported& e) {
    return std::make_exception_ptr(NotSupported(prefix + e.what()));
  } catch (const InvalidArgument& e) {
    return std::make_exception_ptr(InvalidArgument(prefix + e.what()));
  } catch (const ConfigError& e) {
    return std::make_exception_ptr(ConfigError(prefix + e.what()));
  } catch (const std::exception& e) {
    return std::make_exception_ptr(Error(prefix + e.what()));
  } catch (...) {
    return std::make_exception_ptr(Error(prefix + "unknown exception"));
  }
}

}  // namespace switchyard
