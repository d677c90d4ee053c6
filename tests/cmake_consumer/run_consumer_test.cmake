# ctest driver (cmake -P) for the find_package consumer test: install the diffeqlayers build into
# a scratch prefix, then configure, build and run tests/cmake_consumer against that prefix only.
#
# Inputs (-D): BUILD_DIR, CONFIG, SOURCE_DIR, WORK_DIR, GENERATOR, CXX_COMPILER, TORCH_DIR and
# CCACHE (the ccache program, or empty).
cmake_minimum_required(VERSION 3.18)

foreach(var BUILD_DIR SOURCE_DIR WORK_DIR GENERATOR CXX_COMPILER TORCH_DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_consumer_test.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT CONFIG)
  set(CONFIG Release)
endif()

function(run_step what)
  message(STATUS "consumer test: ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${rc})")
  endif()
endfunction()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
# A fresh prefix every time, so that only what `cmake --install` puts there is tested.
file(REMOVE_RECURSE "${prefix}")

run_step("install into ${prefix}"
  "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --config "${CONFIG}" --prefix "${prefix}")

# ccache when the main build uses it (the rest of its launcher only sets ccache's environment).
set(launcher "")
if(CCACHE)
  set(launcher "${CCACHE}")
  # As in the main build: cache keys that do not depend on where the tree is checked out.
  get_filename_component(repo_root "${SOURCE_DIR}/../.." ABSOLUTE)
  set(ENV{CCACHE_BASEDIR} "${repo_root}")
  set(ENV{CCACHE_NOHASHDIR} 1)
endif()

# The consumer gets the prefix and Torch_DIR, nothing from the diffeqlayers source tree.
run_step("configure ${SOURCE_DIR}"
  "${CMAKE_COMMAND}" -S "${SOURCE_DIR}" -B "${build}" -G "${GENERATOR}"
  "-DCMAKE_BUILD_TYPE=${CONFIG}"
  "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
  "-DCMAKE_CXX_COMPILER_LAUNCHER=${launcher}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  "-DTorch_DIR=${TORCH_DIR}")
run_step("build" "${CMAKE_COMMAND}" --build "${build}" --config "${CONFIG}")

# Run the binary from the build tree (single- or multi-config generators).
set(consumer_exe "")
foreach(candidate "${build}/diffeqlayers_consumer" "${build}/${CONFIG}/diffeqlayers_consumer")
  if(EXISTS "${candidate}" AND NOT consumer_exe)
    set(consumer_exe "${candidate}")
  endif()
endforeach()
if(NOT consumer_exe)
  message(FATAL_ERROR "consumer test: diffeqlayers_consumer was not built in ${build}")
endif()
run_step("run ${consumer_exe}" "${consumer_exe}")
