"""The child process that runs a user's tools: `python tool_worker.py TOOLS.py`, driven by `tools.ToolBox`.

It is started as a script, never imported by the package, and uses only the standard library: it starts
in tens of milliseconds (importing minimind_scale would import torch) and holds nothing a killed call
could leave half-done. The protocol is one JSON object per line, on private copies of stdin and stdout:

  worker -> parent, once:   {"tools": [names]}  or  {"error": "why the file did not load"} (then it exits)
  parent -> worker:         {"name": ..., "arguments": {...}, "max_chars": N}
  worker -> parent:         {"content": text}  or  {"error": reason}

The real stdout then points at stderr and stdin at /dev/null, so a tool that prints or reads input
cannot corrupt the protocol. The worker exits when its input closes, i.e. when the parent is gone.
"""
import importlib.util
import inspect
import json
import os
import sys


def _channels():
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr  # line-buffered, so a tool's prints appear as it runs
    return requests, replies


def _send(fd: int, message: dict) -> None:
    data = (json.dumps(message, ensure_ascii=False) + "\n").encode("utf-8")
    while data:
        data = data[os.write(fd, data):]


def _load(path: str) -> dict:
    """The file's public top-level functions defined in it (not imported into it), by name."""
    spec = importlib.util.spec_from_file_location("minimind_scale_user_tools", path)
    if spec is None or spec.loader is None:
        raise ImportError("not importable as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling inside the file look their module up
    spec.loader.exec_module(module)
    return {name: fn for name, fn in vars(module).items()
            if inspect.isfunction(fn) and not name.startswith("_") and fn.__module__ == spec.name}


def _text(result, name: str, max_chars: int) -> dict:
    if isinstance(result, str):
        return {"content": result[:max_chars]}
    try:
        # allow_nan=False: NaN and Infinity are not JSON, and a model should not learn them as if they were.
        text = json.dumps(result, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        return {"error": f"{name} returned a result that is not JSON-serialisable ({type(result).__name__}): {e}"}
    return {"content": text[:max_chars]}


def _run(fn, name: str, arguments: dict, max_chars: int) -> dict:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**arguments)
        except TypeError as e:
            return {"error": f"wrong arguments for {name}: {e}"}
    try:
        result = fn(**arguments)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: a tool must never end the worker
        return {"error": f"{name} raised {type(e).__name__}: {e}"}
    return _text(result, name, max_chars)


def main() -> None:
    requests, replies = _channels()
    path = sys.argv[1]
    # The script's own folder (minimind_scale/agent/) must not shadow anything: tools.py, records.py, ... live there.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # helper modules next to the tools file
    try:
        tools = _load(path)
    except BaseException as e:
        _send(replies, {"error": f"{type(e).__name__}: {e}"})
        return
    _send(replies, {"tools": sorted(tools)})
    for line in requests:
        request = json.loads(line)
        fn = tools.get(request["name"])
        if fn is None:
            reply = {"error": f"unknown tool {request['name']!r}"}
        else:
            reply = _run(fn, request["name"], request["arguments"], request["max_chars"])
        _send(replies, reply)


if __name__ == "__main__":
    main()
