"""Running the tools a model calls: a user's Python functions, in a worker process, safely.

A tools file is plain Python: each public top-level function it defines is a tool, called by name with
the JSON arguments the model wrote (`examples/agent_tools.py` shows the format). `load_tools(path)`
returns a `ToolBox`, which runs the functions in a child process (`tool_worker.py`): a call that hangs
is killed at its timeout and the worker restarted, so a tool can neither stall a run nor crash it.
Every way a call can go wrong becomes an error observation, `{"error": "..."}`, that the model reads
as the tool's answer. The tool schemas the model sees come from the data (the system turn's `tools`),
not from the file; a sample may call only the tools its own schemas declare. Reading the calls out of a reply
is `chat.tool_calls`' job.
"""
from __future__ import annotations

import atexit
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minimind_scale.chat.tool_calls import ParsedCall, parse_arguments
from minimind_scale.errors import UserError

WORKER = Path(__file__).with_name("tool_worker.py")
STARTUP_TIMEOUT_SEC = 60.0  # importing a tools file may import heavy libraries of its own
MAX_REASON_CHARS = 400  # an error observation stays short, whatever the exception's message


@dataclass
class ToolResult:
    """One call's observation: `content` is what the model reads (the error observation when not ok)."""

    name: str | None
    arguments: Any
    content: str
    ok: bool
    error: str | None = None


def error_observation(reason: str) -> str:
    return json.dumps({"error": reason}, ensure_ascii=False)


def _failed(name, arguments, reason: str) -> ToolResult:
    reason = reason if len(reason) <= MAX_REASON_CHARS else reason[:MAX_REASON_CHARS] + "…"
    return ToolResult(name, arguments, error_observation(reason), False, reason)


class _WorkerGone(Exception):
    """The worker exited (or never answered in time) while starting or running a call."""


class _Worker:
    """One `tool_worker.py` child: started, asked, killed. Its own session, so killing it kills whatever the
    tool started too."""

    def __init__(self, path: Path):
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, start_new_session=True, close_fds=True)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.proc.stdout, selectors.EVENT_READ)
        self.buffer = b""

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise _WorkerGone(self._exit_text()) from None

    def receive(self, timeout: float) -> dict | None:
        """The next reply, or None when `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not self.selector.select(left):
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerGone(self._exit_text())
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def _exit_text(self) -> str:
        try:
            code = self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            return "the tool worker stopped answering"
        return f"the tool worker exited with code {code}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                self.proc.kill()
        self.proc.wait()
        self.selector.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for box in list(_LIVE):
        box.close()


class ToolBox:
    """The tools of one file, run one call at a time in a worker process (thread-safe).

    `call` never raises: an unknown or undeclared tool, arguments that are not an object, a wrong
    argument, an exception, a result that is not JSON, or a call running past `timeout_sec` (the worker
    is killed and restarted for the next call) all come back as a failed `ToolResult` whose content is
    `{"error": "..."}`. A result is a string as is, anything else its JSON (`ensure_ascii=False`), cut
    to `max_result_chars`. `close()` (or leaving a `with` block, or interpreter exit) ends the worker.
    """

    def __init__(self, path: Path, names: tuple[str, ...], worker: _Worker, timeout_sec: float,
                 max_result_chars: int):
        self.path, self.names = path, names
        self.timeout_sec, self.max_result_chars = timeout_sec, max_result_chars
        self._worker: _Worker | None = worker
        self._lock = threading.Lock()
        _LIVE.add(self)

    def call(self, name: Any, arguments: Any, allowed: set[str] | None = None) -> ToolResult:
        """Run tool `name` with `arguments` (a dict or its JSON text); `allowed` None permits every tool."""
        if not isinstance(name, str) or not name:
            return _failed(None, arguments, "the tool call has no \"name\"")
        if name not in self.names:
            return _failed(name, arguments, f"unknown tool {name!r} (tools: {', '.join(self.names)})")
        if allowed is not None and name not in allowed:
            declared = ", ".join(sorted(allowed)) or "none"
            return _failed(name, arguments, f"tool {name!r} is not declared for this task (declared: {declared})")
        arguments, problem = parse_arguments(arguments)
        if problem is not None:
            return _failed(name, arguments, problem)
        with self._lock:
            return self._execute(name, arguments)

    def run(self, call: ParsedCall, allowed: set[str] | None = None) -> ToolResult:
        """`call` for a parsed tool-call block; a malformed block gets its parse error as observation."""
        if call.error is not None:
            return _failed(call.name, call.arguments, call.error)
        return self.call(call.name, call.arguments, allowed)

    def _execute(self, name: str, arguments: dict) -> ToolResult:
        try:
            worker = self._started()
        except (_WorkerGone, UserError) as e:
            return _failed(name, arguments, f"the tool worker could not restart: {e}")
        try:
            worker.send({"name": name, "arguments": arguments, "max_chars": self.max_result_chars})
            reply = worker.receive(self.timeout_sec)
        except _WorkerGone as e:
            self._discard()
            return _failed(name, arguments, f"{name} crashed the tool worker ({e})")
        if reply is None:
            self._discard()  # killed now; the next call starts a fresh worker
            return _failed(name, arguments, f"{name} timed out after {self.timeout_sec:g} s")
        if "error" in reply:
            return _failed(name, arguments, reply["error"])
        return ToolResult(name, arguments, reply["content"], True)

    def _started(self) -> _Worker:
        if self._worker is None:
            self._worker, _ = _start(self.path)
        return self._worker

    def _discard(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def close(self) -> None:
        with self._lock:
            self._discard()

    def __enter__(self) -> ToolBox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._discard()
        except Exception:  # interpreter shutdown: the worker exits on its own when its input closes
            pass


def _start(path: Path) -> tuple[_Worker, tuple[str, ...]]:
    """A worker that has imported `path`, and the tool names it found; UserError when the file fails."""
    worker = _Worker(path)
    try:
        hello = worker.receive(STARTUP_TIMEOUT_SEC)
    except _WorkerGone as e:
        worker.kill()
        raise UserError(f"tools file {path}: the tool worker failed to start ({e})") from None
    if hello is None or "error" in hello:
        worker.kill()
        why = f"failed to import: {hello['error']}" if hello else f"took over {STARTUP_TIMEOUT_SEC:g} s to import"
        raise UserError(f"tools file {path} {why}")
    return worker, tuple(hello["tools"])


def load_tools(path: str | Path, timeout_sec: float = 1.0, max_result_chars: int = 2048) -> ToolBox:
    """The tools of a Python file: its public top-level functions (not those it imports from elsewhere).

    A missing file, one that fails to import, or one without any function is a UserError naming it.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"tools file not found: {path}" + (" (it is a directory)" if path.is_dir() else ""))
    if timeout_sec <= 0 or max_result_chars < 1:
        raise UserError("tool timeout_sec must be > 0 and max_result_chars ≥ 1")
    worker, names = _start(path.resolve())
    if not names:
        worker.kill()
        raise UserError(f"tools file {path} defines no tool (no public top-level function)")
    return ToolBox(path.resolve(), names, worker, timeout_sec, max_result_chars)
