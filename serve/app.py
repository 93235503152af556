"""The HTTP side: Starlette routes for the OpenAI API, the page at / and /health, over one Engine."""

import asyncio
import json
import logging
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.resources import files

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.routing import Route

from dg_runtime import Block, DiffusionGemma, Done, Draft, Stats, TextStreamer

from . import openai_api as api
from .engine import Engine, Failed, Job, QueueFull, Started

log = logging.getLogger("dg_serve")


@dataclass
class Finished:
    reply: TextStreamer
    usage: dict
    stats: dict


def create_app(model: DiffusionGemma, model_id: str, api_key: str | None = None, queue_size: int = 16,
               prefix_cache_mb: int = 512, max_body_bytes: int | None = None, image_urls: bool = False) -> Starlette:
    """`max_body_bytes` default: 1 MB, or 32 MB for an artifact that takes images (sent inline, base64).
    `image_urls`: fetch http(s) image URLs (off: only inline data: URLs)."""
    engine = Engine(model, queue_size, prefix_cache_mb << 20)
    max_body_bytes = max_body_bytes or (32 << 20 if model.vision else 1 << 20)
    page = files(__package__).joinpath("page.html").read_text()

    async def read_body(request: HttpRequest) -> dict:
        check_key(request)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise api.ApiError(413, f"the request body is over {max_body_bytes} bytes")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > max_body_bytes:
                raise api.ApiError(413, f"the request body is over {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise api.ApiError(400, f"the request body is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise api.ApiError(400, "the request body must be a JSON object")
        return data

    def check_key(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), api_key.encode()):
            raise api.ApiError(401, "missing or wrong API key: send it as 'Authorization: Bearer KEY'",
                               kind="authentication_error", code="invalid_api_key")

    async def completions(request: HttpRequest, chat: bool):
        body = await read_body(request)
        # off the event loop: images are decoded (and with image_urls fetched) while parsing
        parsed = await asyncio.to_thread(api.parse_request, body, model, model_id, chat, image_urls)
        job = Job(parsed.ids, parsed.settings, parsed.seed, parsed.images)
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise api.ApiError(503, str(exc), kind="server_error", code="queue_full",
                               headers={"Retry-After": str(exc.retry_after)}) from None
        if parsed.stream:
            return StreamingResponse(stream(request, parsed, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for event in run(request, parsed, job):
            if isinstance(event, Finished):
                return JSONResponse(api.response(parsed, model_id, event.reply, event.usage, {"stats": event.stats}))
        raise api.ApiError(499, "the client went away")

    async def run(request: HttpRequest, parsed: api.Request, job: Job):
        """The job as the API sees it: a Draft per step, the reply's text as it becomes final, and Finished. Ends
        the job early when the client goes away (checked at every step) or a stop string ends the reply."""
        reply = model.text_streamer(parsed.settings, parsed.stop)
        cached, steps, started = 0, [], time.perf_counter()
        try:
            while True:
                event = await job.events.get()
                if isinstance(event, Failed):
                    raise api.ApiError(400, event.message) if event.user_error else \
                        api.ApiError(500, event.message, kind="server_error")
                if isinstance(event, Started):
                    cached = event.cached_tokens
                elif isinstance(event, Draft):
                    if await request.is_disconnected():
                        return
                    yield event
                elif isinstance(event, Block):
                    steps.append(event.steps)
                    if text := reply.add(event.tokens[0]):
                        yield text
                    if reply.stop_string_hit:  # the rest of the generation would be thrown away
                        stats = Stats.cut_short(steps, len(reply.tokens), time.perf_counter() - started)
                        yield Finished(reply, api.usage(parsed, reply, cached), api.stats_object(stats, cached))
                        return
                elif isinstance(event, Done):
                    if text := reply.finish():
                        yield text
                    yield Finished(reply, api.usage(parsed, reply, cached), api.stats_object(event.stats, cached))
                    return
        finally:
            job.cancel()

    async def stream(request: HttpRequest, parsed: api.Request, job: Job):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        yield sse(api.chunk(parsed, model_id, first=True))
        try:
            async for event in run(request, parsed, job):
                if isinstance(event, Draft):
                    if parsed.stream_canvas:
                        yield sse(api.chunk(parsed, model_id, choices=False, dg={"canvas": canvas(event)}))
                elif isinstance(event, str):
                    yield sse(api.chunk(parsed, model_id, event))
                else:
                    yield sse(api.chunk(parsed, model_id, finish_reason=event.reply.finish_reason,
                                        dg={"stats": event.stats}))
                    if parsed.include_usage:
                        yield sse(api.chunk(parsed, model_id, choices=False, usage=event.usage))
                    yield "data: [DONE]\n\n"
        except api.ApiError as exc:  # the status line is sent: the error goes in the stream, as OpenAI's does
            yield sse(exc.body())

    def canvas(draft: Draft) -> dict:
        return {"block": draft.block, "step": draft.step,
                "tokens": [model.text.decode([t]) for t in draft.canvas[0]], "accepted": draft.accepted[0].tolist()}

    async def chat_completions(request: HttpRequest):
        return await completions(request, chat=True)

    async def text_completions(request: HttpRequest):
        return await completions(request, chat=False)

    async def list_models(request: HttpRequest):
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": 0, "owned_by": "dg-edge"}]})

    async def health(request: HttpRequest):
        return JSONResponse({"status": "ok", "model": model_id, "backend": model.backend,
                             "modalities": model.manifest.get("modalities", ["text"]),
                             "queued": engine.jobs.qsize(), "running": engine.running is not None, **engine.counts})

    async def index(request: HttpRequest):
        return HTMLResponse(page)

    async def api_error(request: HttpRequest, exc: api.ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: HttpRequest, exc: HTTPException):
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(api.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                         kind=kind).body(), status_code=exc.status_code)

    async def server_error(request: HttpRequest, exc: Exception):
        log.exception("request failed", exc_info=exc)
        return JSONResponse(api.ApiError(500, "internal error; the server log has the details",
                                         kind="server_error").body(), status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", list_models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", text_completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        api.ApiError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.engine = engine
    return app
