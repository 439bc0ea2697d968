"""Whether a test file may run Triton kernels through Triton's interpreter in this process.

TRITON_INTERPRET is read when kernels are defined, so it must be set before anything imports
triton, and it then holds for every kernel of the process. Where triton is already imported
compiled, or where there is a GPU (whose tests need compiled kernels in the same pytest process),
a file's interpreted cases run in a fresh process instead.

Also `require`, the import of a test dependency such as triton: a skip on a developer's machine
without it, a failure under CI (CI=true), which installs every test dependency.
"""

from __future__ import annotations

import os
import sys

import torch  # importing torch does not import triton


def in_ci() -> bool:
    """Whether this is a CI run (CI runners set CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str):
    """Import and return a test dependency. Where it is missing, the calling test file skips, as
    with pytest.importorskip -- except under CI, where it fails: CI installs every test dependency
    (`make install`), so a missing one is a broken install, not a reason to skip ~100 tests."""
    __tracebackhide__ = True  # report the skip or failure at the test file's line
    import importlib

    import pytest
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    if in_ci():
        pytest.fail(f"CI=true and the test dependency {module!r} cannot be imported ({error}); "
                    "install the test dependencies (make install)", pytrace=False)
    pytest.skip(f"could not import {module!r}: {error}", allow_module_level=True)


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


def rerun_pytest(test_file: str, env: dict, select: str | None = None) -> None:
    """Run one test file (optionally `-k select`) in a fresh Python process with `env`; fail with
    the end of its output unless every selected case passed."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    if select:
        cmd += ["-k", select]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=repo)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def in_process_marker(triton_already_compiled: bool):
    """The marker for a file's interpreted cases: they skip in a process where triton was
    imported compiled first (the file's test_rerun_in_fresh_process then runs them)."""
    import pytest
    return pytest.mark.skipif(triton_already_compiled,
                              reason="triton was imported compiled first; see test_rerun_in_fresh_process")
