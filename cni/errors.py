"""CNI error codes and the one exception type every plugin failure is turned into.

The runtime reads a failure as a JSON error object on stdout plus a non-zero exit; keeping a single
exception type with a spec code means every layer can fail the same way and the entry point can
render it without knowing where it came from.
"""

from __future__ import annotations

import json

# Codes defined by the CNI spec (SPEC.md, "Error" section).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
LIMITED_CONNECTIVITY = 51

# Plugin-specific codes (the spec reserves 100 and up for plugins).
POOL_EXHAUSTED = 100
CHECK_FAILED = 101
KERNEL_FAILURE = 102
TIMED_OUT = 103  # the agent's deadline passed with the call still running: its outcome is unknown
INTERNAL_ERROR = 999


class CniError(Exception):
    """A failure the runtime must see as a CNI error object."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> bytes:
        body = {"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details}
        return json.dumps(body).encode() + b"\n"
