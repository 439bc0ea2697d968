"""Whether a test file may run Triton kernels through Triton's interpreter in this process.

TRITON_INTERPRET is read when kernels are defined, so it must be set before anything imports
triton, and it then holds for every kernel of the process. Where triton is already imported
compiled, or where there is a GPU (whose tests need compiled kernels in the same pytest process),
a file's interpreted cases run in a fresh process instead.
"""

from __future__ import annotations

import os
import sys

import torch  # importing torch does not import triton


def enter_interpreter(compiled: bool = False) -> bool:
    """Switch this process to the interpreter when that is safe (and `compiled` was not asked
    for). Returns True when the interpreted cases must run in a fresh process instead."""
    if compiled:
        return False
    elsewhere = os.environ.get("TRITON_INTERPRET") != "1" and (
        "triton" in sys.modules or torch.cuda.is_available())
    if not elsewhere:
        os.environ["TRITON_INTERPRET"] = "1"
    return elsewhere
