"""`serve`: a model behind OpenAI's chat-completions API, with a chat page at `/`.

This module is the command: its options, loading the model (as a generation backend, `--generation_backend`),
binding the address, and running uvicorn until Ctrl-C. The routes are in serve_app.py, the request schema in
serve_schema.py, the generation thread in serve_worker.py and the reply's reasoning / tool-call parsing in
reply_parser.py.
"""
from __future__ import annotations

import copy
import socket
import sys
from typing import Literal

from pydantic import Field

from minimind_scale.config import StrictConfig
from minimind_scale.errors import UserError
from minimind_scale.generation.registry import DEFAULT_BACKEND, BackendName
from minimind_scale.inference.serve_schema import GREEDY_BELOW
from minimind_scale.models.yarn import DEFAULT_ORIGINAL_POSITIONS, YarnFactor, YarnOriginalPositions


class ServeConfig(StrictConfig):
    """Serve a model directory over HTTP: POST /v1/chat/completions (OpenAI's schema, streamed or not, with
    reasoning_content and tool_calls), GET /v1/models, GET /health, and a chat page at /. Requests are answered
    one at a time, in arrival order."""

    model: str = Field(..., description="Hugging Face model directory (e.g. out/full_sft/final)")
    adapter: str | None = Field(None, description="a LoRA (peft) adapter directory to apply on top of the model")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8998, ge=0, le=65535, description="port to listen on (0: any free port, printed at start)")
    max_tokens: int = Field(512, ge=1, description="answer length when a request sets no max_tokens")
    temperature: float = Field(0.7, ge=0, le=2,
                               description=f"temperature when a request sets none (below {GREEDY_BELOW:g}: greedy)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass when a request sets none")
    max_queue: int = Field(64, ge=1, description="requests that may wait for the model; more are refused with 503")
    served_model_name: str | None = Field(None, description="the model id in the API (default: the --model path)")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="weights dtype: auto = bf16 on a GPU that supports it, else fp32")
    yarn_factor: YarnFactor = None
    yarn_original_max_position_embeddings: YarnOriginalPositions = DEFAULT_ORIGINAL_POSITIONS
    generation_backend: BackendName = DEFAULT_BACKEND


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6), or a UserError saying why not."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    return sock


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(cfg: ServeConfig) -> None:
    from minimind_scale.generation.registry import load_backend

    _check_serve_packages()
    generator, tokenizer = load_backend(cfg.generation_backend, cfg.model, adapter=cfg.adapter, dtype=cfg.dtype,
                                        yarn_factor=cfg.yarn_factor,
                                        yarn_original_max_position_embeddings=cfg.yarn_original_max_position_embeddings)
    try:
        _serve(generator, tokenizer, cfg)
    finally:
        generator.close()


def _check_serve_packages() -> None:
    """The optional packages serve needs, checked before the model loads."""
    try:
        import uvicorn  # noqa: F401

        from minimind_scale.inference import serve_app  # noqa: F401  (fastapi and starlette)
    except ImportError as e:
        raise UserError(f"serve needs its packages ({e.name} is missing): pip install -e \".[serve]\"") from None


def _serve(generator, tokenizer, cfg: ServeConfig) -> None:
    """Bind, answer through one generation worker until the server stops, then stop the worker."""
    import uvicorn

    from minimind_scale.inference.serve_app import ChatService, build_app
    from minimind_scale.inference.serve_worker import GenerationWorker

    sock = bind(cfg.host, cfg.port)
    worker = GenerationWorker(generator, tokenizer, cfg.max_queue)
    name = cfg.served_model_name or cfg.model
    service = ChatService(worker, copy.deepcopy(tokenizer), name, generator.context_length, cfg.max_tokens,
                          cfg.temperature, cfg.top_p)
    url = _url(cfg.host, sock.getsockname()[1])
    print(f"serving {name} at {url} (chat page {url}/, API {url}/v1); Ctrl-C stops", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(service), log_level="warning", timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        worker.close()
