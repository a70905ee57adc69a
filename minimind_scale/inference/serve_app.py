"""The HTTP side of `serve`: a FastAPI app with OpenAI's routes and the chat page.

`ChatService` turns a checked request into a prompt (refusing one the context cannot hold), hands it
to the generation worker and turns the worker's text into an answer: one JSON body, or server-sent
events ending with `data: [DONE]`. Both paths feed the same text through the same `ReplyParser`, so
a streamed answer is the non-streamed one in pieces.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from minimind_scale.chat.markup import THINK_CLOSE, THINK_OPEN
from minimind_scale.chat.reply_parser import ReplyParser
from minimind_scale.chat.template import render_chat
from minimind_scale.inference.serve_schema import (
    ApiError,
    ChatCompletion,
    ChatRequest,
    ErrorResponse,
    chunk,
    completion,
    completion_id,
    decode_body,
    finish_reason,
    parse_request,
    piece_delta,
    prompt_parts,
    request_schemas,
    sampling_temperature,
    usage,
)
from minimind_scale.inference.serve_worker import Done, Failed, Generation, GenerationWorker, QueueFull, Text

CHAT_PAGE = Path(__file__).parents[1] / "assets" / "chat.html"
DISCONNECT_POLL_SEC = 0.5
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SCHEMAS = "#/components/schemas/"
LOG = logging.getLogger("uvicorn.error")  # the logger uvicorn prints at serve's log level


@dataclass
class Prepared:
    generation: Generation
    in_reasoning: bool  # the prompt opened a think block: the reply starts inside it
    parse_tools: bool
    include_usage: bool

    def parser(self) -> ReplyParser:
        return ReplyParser(self.in_reasoning, self.parse_tools)


@dataclass
class ChatService:
    worker: GenerationWorker
    tokenizer: object  # the request side's own copy: the worker's is busy decoding on its thread
    model_name: str
    context: int  # positions the model reads: prompt plus answer
    max_tokens: int
    temperature: float
    top_p: float

    def prepare(self, request: ChatRequest, raw_tools: list | None) -> Prepared:
        messages, tools, template_kwargs = prompt_parts(request, raw_tools)
        self._refuse_reserved(template_kwargs)
        try:
            text = render_chat(messages, tools, self.tokenizer, add_generation_prompt=True, **template_kwargs)
        except Exception as e:  # a jinja template raises its own error types on inputs it rejects
            raise ApiError(400, f"the model's chat template cannot render these messages: {e}",
                           param="messages") from None
        prompt_ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        limit = request.answer_limit
        room = self.context - len(prompt_ids)
        if room <= 0 or (limit is not None and limit > room):
            asked = f" plus max_tokens {limit}" if limit is not None and room > 0 else ""
            raise ApiError(400, f"the prompt is {len(prompt_ids)} tokens{asked}, more than the model's context of "
                                f"{self.context} tokens", param="messages" if room <= 0 else "max_tokens",
                           code="context_length_exceeded")
        generation = Generation(
            prompt_ids, limit if limit is not None else min(self.max_tokens, room),
            sampling_temperature(self.temperature if request.temperature is None else request.temperature),
            self.top_p if request.top_p is None else request.top_p, request.seed)
        return Prepared(generation, text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE), request.uses_tools,
                        bool(request.stream_options and request.stream_options.include_usage))

    def _refuse_reserved(self, template_kwargs: dict) -> None:
        """Refuse chat_template_kwargs that name an argument of the rendering call itself rather than a template
        variable (`tokenize`, `tools`, ...): passed on, they would collide with the server's own."""
        own = {*inspect.signature(render_chat).parameters, *inspect.signature(
            self.tokenizer.apply_chat_template).parameters} - {"kwargs"}
        if taken := sorted(own & template_kwargs.keys()):
            raise ApiError(400, f"chat_template_kwargs.{taken[0]}: set by the server, not a template variable",
                           param=f"chat_template_kwargs.{taken[0]}")

    def start(self, prepared: Prepared):
        """(job, events): the queued job and the asyncio queue its events arrive on."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the server is shutting down; nobody waits for this event
                pass

        try:
            return self.worker.submit(prepared.generation, emit), events
        except QueueFull:
            raise ApiError(503, f"the server is busy ({self.worker.waiting} requests waiting); retry later",
                           code="server_busy", type="server_error") from None

    async def complete(self, prepared: Prepared) -> dict:
        job, events = self.start(prepared)
        parser, pieces = prepared.parser(), []
        try:
            while True:
                event = await events.get()
                if isinstance(event, Text):
                    pieces += parser.feed(event.text)
                elif isinstance(event, Failed):
                    raise ApiError(500, event.message, type="server_error")
                else:
                    pieces += parser.finish()
                    return completion(completion_id(), self.model_name, pieces, event.reason,
                                      len(prepared.generation.prompt_ids), event.completion_tokens)
        finally:
            job.cancel()

    async def stream(self, prepared: Prepared, job, events):
        """The answer as server-sent events: a role chunk, one chunk per piece, the finish chunk, [DONE]."""
        cid, parser, calls = completion_id(), prepared.parser(), 0
        try:
            yield _sse(chunk(cid, self.model_name, {"role": "assistant", "content": ""}))
            while isinstance(event := await events.get(), Text):
                for piece in parser.feed(event.text):
                    yield _sse(chunk(cid, self.model_name, piece_delta(piece, calls)))
                    calls += piece.call is not None
            if isinstance(event, Failed):
                yield _sse(ApiError(500, event.message, type="server_error").body())
            else:
                for piece in parser.finish():
                    yield _sse(chunk(cid, self.model_name, piece_delta(piece, calls)))
                    calls += piece.call is not None
                for closing in self._closing_chunks(cid, prepared, event, calls):
                    yield _sse(closing)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client may have gone: stop generating for nobody

    def _closing_chunks(self, cid: str, prepared: Prepared, done: Done, calls: int) -> list[dict]:
        """The finish chunk, carrying the usage, or with stream_options.include_usage OpenAI's usage-only chunk
        after it."""
        counts = usage(len(prepared.generation.prompt_ids), done.completion_tokens)
        finish = chunk(cid, self.model_name, {}, finish_reason(done.reason, calls > 0),
                       usage_=None if prepared.include_usage else counts)
        return [finish, chunk(cid, self.model_name, {}, usage_=counts, choices=False)] if prepared.include_usage \
            else [finish]


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (application/json or a +json type, any parameters)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _json_body(request: Request):
    """The request's JSON body; ApiError 415 for another content type, 400 for a body that is not JSON, 499
    (logged as one line) when the client hangs up before sending all of it."""
    if not _is_json(request.headers.get("content-type")):
        raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), not "
                            f"{request.headers.get('content-type') or 'unnamed'}", type="invalid_request_error")
    try:
        body = await request.body()
    except ClientDisconnect:
        LOG.warning("%s %s: the client closed the connection before sending the whole request body",
                    request.method, request.url.path)
        raise ApiError(499, "the client closed the connection") from None
    return decode_body(body)


async def _unless_disconnected(request: Request, answer):
    """Await `answer`, cancelling it (and so its generation) if the client goes away first: a client that
    timed out must not keep the worker busy for nobody."""
    task = asyncio.ensure_future(answer)
    while not (await asyncio.wait({task}, timeout=DISCONNECT_POLL_SEC))[0]:
        if await request.is_disconnected():
            task.cancel()
            raise ApiError(499, "the client closed the connection")
    return task.result()


CHAT_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": SCHEMAS + "ChatRequest"}}}}}


def _openapi_document(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document plus the request schema: the route reads its body itself (strictly, with
    OpenAI's errors), so FastAPI does not see ChatRequest."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, routes=app.routes)
        document.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas(SCHEMAS))
        app.openapi_schema = document
    return app.openapi_schema


def build_app(service: ChatService) -> FastAPI:
    app = FastAPI(title="minimind_scale serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.openapi = lambda: _openapi_document(app)
    page = CHAT_PAGE.read_text(encoding="utf-8")
    created = int(time.time())
    card = {"id": service.model_name, "object": "model", "created": created, "owned_by": "minimind_scale"}

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(_: Request, e: Exception):
        return JSONResponse(ApiError(500, f"internal error ({type(e).__name__}: {e})", type="server_error").body(),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_name, "waiting": service.worker.waiting}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != service.model_name:
            raise ApiError(404, f"model {model_id!r} is not served here (it serves {service.model_name!r})",
                           param="model", code="model_not_found", type="not_found_error")
        return card

    @app.post("/v1/chat/completions", response_model=ChatCompletion, openapi_extra=CHAT_REQUEST_BODY,
              responses={code: {"model": ErrorResponse} for code in (400, 415, 503)})
    async def chat_completions(request: Request):
        data = await _json_body(request)
        parsed = parse_request(data)
        prepared = service.prepare(parsed, data.get("tools"))
        if not parsed.stream:
            return JSONResponse(await _unless_disconnected(request, service.complete(prepared)))
        job, events = service.start(prepared)  # before the response starts: a full queue is still an HTTP error
        return StreamingResponse(service.stream(prepared, job, events), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    return app
