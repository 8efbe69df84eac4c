"""cffi (API mode) build of the libfuse3 shim: compiled at install into cusetpm._native.

API mode lets the C compiler check libfuse's structs (bit-fields in fuse_file_info) and
pick the right symbol versions, which ABI mode cannot.  shim.h is the C API Python
calls; callbacks.h lists the functions Python implements (cffi `extern "Python+C"`:
non-static, so shim.c, a separate translation unit, can call them).
"""

import pathlib
import shlex
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent


def pkg_config(*args: str) -> list[str]:
    out = subprocess.run(["pkg-config", *args, "fuse3"], check=True, capture_output=True, text=True)
    return shlex.split(out.stdout)


ffibuilder = FFI()
ffibuilder.cdef((HERE / "shim.h").read_text())
ffibuilder.cdef('extern "Python+C" {\n' + (HERE / "callbacks.h").read_text() + "\n}\n")
ffibuilder.set_source(
    "cusetpm._native",
    '#include "shim.h"\n#include "callbacks.h"\n',
    sources=[str(HERE / "shim.c")],
    include_dirs=[str(HERE)],
    depends=[str(HERE / name) for name in ("shim.h", "callbacks.h", "shim.c")],
    extra_compile_args=[*pkg_config("--cflags"), "-Wall", "-Wextra", "-Wno-unused-parameter"],
    extra_link_args=pkg_config("--libs"),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
