"""The names of a compiled TVM artifact folder: what `edgeattn compile` writes and the runtime reads.

Its own module so that the loader (tvm_backend.py, which must run with TVM's runtime library
alone) and the compiler (tvm_compile.py) share one definition without importing each other.
"""

ARTIFACT_FORMAT = "edgeattn-tvm-artifact"
ARTIFACT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
PARAMS = "params.bin"
