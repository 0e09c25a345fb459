# cmake -DSTAGE=<dir of the generated health_pb2*.py> -DOUT=<.../vdm_client/_health>
#   -P relocate_health.cmake
# Copies protoc's grpc/health/v1 stubs into the package vdm_client._health,
# pointing health_pb2_grpc.py's import of health_pb2 at the new place (see
# CMakeLists.txt for why they must not stay under a top-level `grpc`).
foreach(var STAGE OUT)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "relocate_health.cmake: -D${var}= is required")
  endif()
endforeach()
set(old_import "from grpc.health.v1 import health_pb2 ")
set(new_import "from vdm_client._health import health_pb2 ")
file(READ ${STAGE}/health_pb2_grpc.py stub)
string(FIND "${stub}" "${old_import}" at)
if(at EQUAL -1)
  message(FATAL_ERROR "relocate_health.cmake: no \"${old_import}\" in "
    "${STAGE}/health_pb2_grpc.py (has grpc_python_plugin changed?)")
endif()
string(REPLACE "${old_import}" "${new_import}" stub "${stub}")
file(MAKE_DIRECTORY ${OUT})
file(WRITE ${OUT}/health_pb2_grpc.py "${stub}")
configure_file(${STAGE}/health_pb2.py ${OUT}/health_pb2.py COPYONLY)
file(WRITE ${OUT}/__init__.py
  "# grpc.health.v1 stubs generated from grpc/health/v1/health.proto, kept\n"
  "# inside vdm_client so that they do not shadow the `grpc` module.\n")
