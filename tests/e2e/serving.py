"""A real `serve` process for the tests: the CLI in a subprocess on 127.0.0.1, a port the OS picks, stopped at
the end."""
from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import cli_env

BANNER = re.compile(r"serving .* at (http://127\.0\.0\.1:\d+) ")


@contextlib.contextmanager
def running_server(model_dir: Path, log: Path, cache: Path, *extra: str, startup_timeout: float = 120.0):
    """Yield the base URL of `python -m minimind_scale serve --model model_dir --port 0`, once /health answers."""
    cmd = [sys.executable, "-m", "minimind_scale", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", "0", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cli_env(cache))
    try:
        yield _wait_until_up(proc, log, startup_timeout)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_up(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode} before answering:\n{log.read_text()[-4000:]}")
        found = BANNER.search(log.read_text())
        if found:
            try:
                with urllib.request.urlopen(found.group(1) + "/health", timeout=5) as r:
                    if r.status == 200:
                        return found.group(1)
            except OSError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"serve did not answer /health within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def post_json(url: str, body: bytes | dict, timeout: float = 60.0) -> tuple[int, dict]:
    """(status, JSON body) of a POST, whatever the status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def is_openai_error(body) -> bool:
    """Whether a response body has OpenAI's error shape: {"error": {"message": str, "type": str, ...}}."""
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and isinstance(error.get("message"), str) and bool(error["message"]) \
        and isinstance(error.get("type"), str)
