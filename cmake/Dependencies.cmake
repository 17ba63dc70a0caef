# Third-party dependencies, all from Debian 12 packages (see README.md, "Dependencies").
find_package(Threads REQUIRED)
find_package(absl REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
find_package(PkgConfig REQUIRED)
find_package(OpenSSL REQUIRED)  # libcrypto: SHA-256 of source configs (model/safetensors_writer)
pkg_check_modules(PCRE2 REQUIRED IMPORTED_TARGET libpcre2-8)
pkg_check_modules(OPENBLAS REQUIRED IMPORTED_TARGET openblas)

if(LORC_WITH_GRPC)
  find_package(Protobuf REQUIRED)
  find_package(gRPC CONFIG QUIET)
  if(NOT gRPC_FOUND)
    pkg_check_modules(GRPCPP REQUIRED IMPORTED_TARGET grpc++)
    add_library(gRPC::grpc++ ALIAS PkgConfig::GRPCPP)
  endif()
  find_program(LORC_GRPC_CPP_PLUGIN grpc_cpp_plugin REQUIRED)
  # The coordinator's metrics (metrics/): core (registry, atomics) and pull (the /metrics HTTP
  # endpoint over civetweb). Debian's prometheus-cpp-dev.
  find_package(prometheus-cpp CONFIG REQUIRED)
endif()

if(LORC_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
