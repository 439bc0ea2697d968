"""The engine core in a process of its own, for AsyncLLM.

    server process                                  engine-core process
      AsyncLLM (HTTP, tokenizer, detokenizer)          EngineCore (scheduler, executor)
      EngineCoreProcClient.add_request  ---- pipe -->  applied before the next step
      reader thread <-- pipe ---- EngineCoreOutputs    one message per step

With the core in a thread of the server's process, the engine's host work (scheduling, the
runner's bookkeeping, kernel launches) and the HTTP work (parsing, output processing, one server-
sent event per request per step) take turns holding one GIL. Here each has its own interpreter,
and what crosses is small: a Request when it is added, and per step one EngineCoreOutput per
request (new token ids, logprobs, finish reason) plus the scheduler's counters.

The client has EngineCore's inbox methods (add_request, abort_requests, finish_requests), so
AsyncLLM and EngineFrontend use either the same way. The child is started with `spawn` (CUDA
needs a fresh process), stops when told to, when its pipe closes, or when the parent dies, and
the client reports a child that died (killed, out of memory) to every waiting stream.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.util as mp_util
import os
import threading
import time
from collections.abc import Callable

from folovllm.config import EngineConfig
from folovllm.logger import init_logger

logger = init_logger(__name__)

STARTUP_TIMEOUT_S = 900.0


class EngineCoreProcError(RuntimeError):
    """The engine-core process failed to start, or died."""


def _parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def run_engine_core(config: EngineConfig, commands, outputs, parent_pid: int) -> None:
    """The child's main loop: apply queued commands, step while there is work, send each step's
    outputs. Runs until told to stop, until the parent goes away, or until the core raises (the
    error is sent before the process ends)."""
    import signal

    from folovllm.engine.core import EngineCore, freeze_startup_heap

    # Ctrl-C reaches the whole process group: the parent decides (it aborts what is in flight
    # and then tells this process to stop), so the child does not die half-way through a step.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        core = EngineCore(config)
    except BaseException as e:  # noqa: BLE001  the parent must hear why
        outputs.send(("failed", f"{type(e).__name__}: {e}"))
        return
    # This process lives to serve: what start-up left need not be walked by every full collection.
    core.startup_times["gc_freeze"] = freeze_startup_heap()
    outputs.send(("ready", config.cache_config.num_gpu_blocks, core.startup_times))
    try:
        while True:
            # Block on the pipe only when idle; poll() with a timeout also notices a dead parent.
            if commands.poll(0 if core.has_work() else 0.5):
                while True:
                    kind, *args = commands.recv()
                    if kind == "add":
                        core.add_request(args[0])
                    elif kind == "finish":
                        core.finish_requests(args[0], args[1])
                    elif kind == "reset_prefix_cache":
                        outputs.send(("reset_prefix_cache", core.reset_prefix_cache()))
                    elif kind == "shutdown":
                        core.shutdown()
                        return
                    if not commands.poll(0):
                        break
            elif not _parent_alive(parent_pid):
                return
            if core.has_work():
                outputs.send(("outputs", core.step()))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away, or is being interrupted with us: nothing to report to
    except BaseException as e:  # noqa: BLE001
        logger.exception("the engine-core process stopped")
        try:
            outputs.send(("failed", f"{type(e).__name__}: {e}"))
        except (OSError, ValueError):
            pass


class EngineCoreProcClient:
    """Starts the engine-core process and talks to it. `start_output_thread(on_outputs,
    on_dead)` hands each step's EngineCoreOutputs (and a death) to callbacks, from a reader
    thread."""

    def __init__(self, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")
        cmd_recv, self._commands = ctx.Pipe(duplex=False)
        self._outputs, out_send = ctx.Pipe(duplex=False)
        self._send_lock = threading.Lock()
        self._closed = False
        self._reader: threading.Thread | None = None
        self._reset_replies: list = []
        self._reset_event = threading.Event()
        # Not a daemon, so that it may start tensor-parallel workers of its own; it is stopped at
        # interpreter exit by the finalizer below (before multiprocessing joins its children).
        self.process = ctx.Process(target=run_engine_core, args=(config, cmd_recv, out_send, os.getpid()),
                                   name="folovllm-engine-core", daemon=False)
        self.process.start()
        self._finalizer = mp_util.Finalize(self, _stop_child, args=(self.process, self._commands),
                                           exitpriority=10)
        cmd_recv.close()
        out_send.close()  # only the child holds the write end now: its death ends recv() with EOFError
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._outputs.poll(0.2):
            if not self.process.is_alive():
                raise EngineCoreProcError(f"the engine-core process exited during start-up "
                                          f"(exit code {self.process.exitcode}); see its log above")
            if time.monotonic() > deadline:
                self.process.kill()
                raise EngineCoreProcError(f"the engine-core process did not start within {STARTUP_TIMEOUT_S:.0f} s")
        msg = self._outputs.recv()
        if msg[0] != "ready":
            self.process.join(5)
            raise EngineCoreProcError(f"the engine core failed to start: {msg[1]}")
        config.cache_config.num_gpu_blocks = msg[1]
        self.startup_times = msg[2]

    # ---- EngineCore's inbox methods (any thread) ---------------------------------------

    def _send(self, *msg) -> None:
        with self._send_lock:
            if self._closed:
                return
            try:
                self._commands.send(msg)
            except (OSError, ValueError) as e:  # the child is gone: the reader thread reports it
                logger.debug("engine-core pipe closed: %s", e)

    def add_request(self, request) -> None:
        self._send("add", request)

    def abort_requests(self, request_ids: list[str]) -> None:
        from folovllm.request import RequestStatus
        self.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, request_ids: list[str], status) -> None:
        if request_ids:
            self._send("finish", list(request_ids), status)

    def reset_prefix_cache(self, timeout: float = 30.0) -> bool:
        self._reset_event.clear()
        self._send("reset_prefix_cache")
        if not self._reset_event.wait(timeout):
            raise EngineCoreProcError("the engine-core process did not answer reset_prefix_cache")
        return self._reset_replies.pop()

    # ---- outputs -----------------------------------------------------------------------

    def start_output_thread(self, on_outputs: Callable, on_dead: Callable[[BaseException], None]) -> None:
        if self._reader is not None:
            return

        def read() -> None:
            while True:
                try:
                    msg = self._outputs.recv()
                except (EOFError, OSError):
                    if not self._closed:
                        on_dead(EngineCoreProcError(
                            f"the engine-core process died (exit code {self._exitcode()})"))
                    return
                if msg[0] == "outputs":
                    on_outputs(msg[1])
                elif msg[0] == "reset_prefix_cache":
                    self._reset_replies.append(msg[1])
                    self._reset_event.set()
                elif msg[0] == "failed":
                    on_dead(EngineCoreProcError(f"the engine core stopped on an error: {msg[1]}"))
                    return

        self._reader = threading.Thread(target=read, name="folovllm-core-output-reader", daemon=True)
        self._reader.start()

    def _exitcode(self):
        self.process.join(1.0)
        return self.process.exitcode

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the child to stop, then make sure it has: terminate, then kill."""
        with self._send_lock:
            self._closed = True
        _stop_child(self.process, self._commands, timeout)
        self._finalizer.cancel()


def _stop_child(process, commands, timeout: float = 5.0) -> None:
    try:
        commands.send(("shutdown",))
    except (OSError, ValueError):
        pass
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(2.0)
    if process.is_alive():
        process.kill()
        process.join(2.0)
    commands.close()
