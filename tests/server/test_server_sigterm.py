"""`python -m folovllm serve MODEL` as a real process: it serves, and SIGTERM in the middle of
streaming requests ends it within a few seconds, cleanly, with no child process left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from server_support import free_port

REPO = Path(__file__).resolve().parents[2]


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_under_load_exits_cleanly(tiny_models_with_tokenizer):
    path = tiny_models_with_tokenizer["llama"][0]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "folovllm", "serve", path, "--port", str(port),
                             "--served-model-name", "m", "--device", "cpu", "--max-model-len", "512",
                             "--block-size", "8"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "ab", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1

        started = threading.Barrier(5)
        results = []

        def stream():
            body = {"model": "m", "prompt": "abc", "max_tokens": 500, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as resp:
                    lines = resp.iter_lines()
                    next(lines)
                    started.wait(10)
                    results.append(sum(1 for line in lines if line.startswith("data: {")))
            except httpx.HTTPError as e:
                results.append(e)

        threads = [threading.Thread(target=stream, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait(30)
        kids = children_of(proc.pid)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        took = time.monotonic() - t0
        assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), rc
        assert took < 5, f"took {took:.1f} s to exit"
        for t in threads:
            t.join(10)
        # Every stream ended, cut short (aborted, not served to its 500th token) rather than hanging.
        assert len(results) == 4 and all(isinstance(n, int) and n < 499 for n in results), results
        print(f"SIGTERM: exit code {rc} after {took:.2f} s; streams cut after {results} chunks")
        deadline = time.monotonic() + 5
        while any(alive(k) for k in kids):
            assert time.monotonic() < deadline, f"children left: {[k for k in kids if alive(k)]}"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
