"""How the suite treats what it depends on: a missing test dependency skips on a developer's machine
but fails under CI (CI=true), and the real GGUF model is only for tests marked slow, so the quick
loop `pytest -m "not slow"` never fetches it. Each case runs pytest in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# pytest's exit codes: an error while collecting; no test left to run (a file skipped whole at
# import, or every test deselected).
FAILED, ALL_SKIPPED = pytest.ExitCode.INTERRUPTED, pytest.ExitCode.NO_TESTS_COLLECTED


def pytest_run(args: list[str], cwd: Path, ci: bool, pythonpath: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TRITON_INTERPRET")}
    if ci:
        env["CI"] = "true"
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + env.get("PYTHONPATH", "").split(os.pathsep))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def without_triton(tmp_path) -> Path:
    """A folder that, first on PYTHONPATH, makes `import triton` fail as if it were not installed."""
    shim = tmp_path / "no_triton" / "triton"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'triton' (hidden by the test)\", name='triton')\n")
    return shim.parent


@pytest.mark.parametrize("ci", [False, True], ids=["developer", "ci"])
def test_interpreter_tests_without_triton(without_triton, ci):
    rc, out = pytest_run(["tests/unit/test_skinny_gemm.py"], REPO, ci, pythonpath=without_triton)
    if ci:
        assert rc == FAILED and "CI=true and the test dependency 'triton' cannot be imported" in out, out
    else:
        assert rc == ALL_SKIPPED and "1 skipped" in out and "could not import 'triton'" in out, out


def test_any_importorskip_fails_under_ci(tmp_path):
    """conftest turns any module-level skip for a missing import into a failure under CI, even one
    from a bare pytest.importorskip rather than interpret_mode.require."""
    for name in ("conftest.py", "interpret_mode.py", "server_support.py"):
        (tmp_path / name).write_text((TESTS / name).read_text())
    (tmp_path / "test_needs_it.py").write_text(
        "import pytest\npytest.importorskip('folovllm_no_such_module')\n\ndef test_it():\n    pass\n")
    rc, out = pytest_run(["test_needs_it.py"], tmp_path, ci=True)
    assert rc == FAILED and "CI=true, so a missing test dependency fails" in out, out


def test_not_slow_deselects_the_real_model_tests():
    rc, out = pytest_run(["--collect-only", "-m", "not slow", "tests/integration/test_real_model.py"], REPO, False)
    assert rc == ALL_SKIPPED and "deselected" in out, out


def test_fetching_the_real_model_outside_a_slow_test_fails(monkeypatch):
    from folovllm import assets

    def no_download(*args, **kwargs):
        raise AssertionError("the guard let a download through")

    monkeypatch.setattr(assets, "_pip_download", no_download)
    with pytest.raises(pytest.fail.Exception, match="mark it @pytest.mark.slow"):
        assets.resolve_model(assets.DEFAULT_MODEL)
