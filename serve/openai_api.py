"""OpenAI's chat and completions API over DiffusionGemma: request bodies in, response objects and stream chunks out.

Fields the model has no use for (`temperature`, `top_p`, penalties, `user`, ...) are accepted and ignored, as
local servers do, so that clients work unchanged. DiffusionGemma's own settings are extra body fields (EXTRA_FIELDS).
"""

import secrets
import time
from dataclasses import dataclass, field

from dg_runtime import DiffusionGemma, PromptTooLong, Settings, TextStreamer, UserError

# extra body field -> runtime setting
EXTRA_FIELDS = {"steps": "max_denoising_steps", "entropy_bound": "entropy_bound", "t_max": "t_max", "t_min": "t_min",
                "stability_threshold": "stability_threshold", "confidence_threshold": "confidence_threshold",
                "fast": "fast", "freeze_after": "freeze_after", "refresh_every": "refresh_every"}
# runtime setting -> the API's name for it, to word the runtime's errors
API_NAMES = {"max_new_tokens": "max_tokens", **{setting: name for name, setting in EXTRA_FIELDS.items()}}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOPS = 4
IMAGE_URL_TIMEOUT, MAX_IMAGE_URL_BYTES = 10, 32 << 20  # an image fetched for --allow-image-urls


class ApiError(Exception):
    """An error answered with `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    chat: bool
    ids: list[int]
    settings: Settings
    seed: int
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    stream_canvas: bool = False
    images: list = field(default_factory=list)  # decoded, for the image tokens in `ids`
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))


def parse_request(body: dict, model: DiffusionGemma, model_id: str, chat: bool, image_urls: bool = False) -> Request:
    """Check a chat or completions body and turn it into token ids and settings; ApiError names the first problem.
    `image_urls`: image_url parts may be http(s) URLs, fetched here (dg-serve --allow-image-urls)."""
    if "model" in body and body["model"] != model_id:
        raise ApiError(404, f"model {body['model']!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")
    ids, images = chat_ids(body, model, image_urls) if chat else (prompt_ids(body, model), [])
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (got {n!r}): this server generates one choice per request", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        raise ApiError(400, f"max_tokens must be a whole number of at least 1 (got {max_tokens!r})", param="max_tokens")
    overrides = {setting: body.get(name) for name, setting in EXTRA_FIELDS.items()}
    try:
        settings = model.defaults.with_overrides(max_new_tokens=max_tokens, **overrides)
        model.check_length(len(ids), settings)
    except PromptTooLong as exc:
        raise ApiError(400, exc.worded(API_NAMES), param="messages" if chat else "prompt",
                       code="context_length_exceeded") from None
    except UserError as exc:
        raise ApiError(400, exc.worded(API_NAMES), param=API_NAMES.get(exc.field, exc.field)) from None
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(2**31)
    elif not is_int(seed) or seed < 0:
        raise ApiError(400, f"seed must be a whole number of 0 or more (got {seed!r})", param="seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false (got {stream!r})", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return Request(chat, ids, settings, seed, stop_strings(body.get("stop")), stream,
                   bool(options.get("include_usage")), bool(body.get("stream_canvas")), images)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def chat_ids(body: dict, model: DiffusionGemma, image_urls: bool = False) -> tuple[list[int], list]:
    """The conversation's token ids (images expanded to their tokens) and its images, decoded, in order."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    rendered, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role {role!r} is not one of {', '.join(ROLES)}", param=f"{where}.role")
        content, found = message_content(message.get("content"), f"{where}.content", model, image_urls)
        rendered.append({"role": ROLES[role], "content": content})
        images += found
    try:
        ids = model.text.chat_ids(rendered)
        return (model.place_images(ids, images) if images else ids), images
    except UserError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def message_content(content, where: str, model: DiffusionGemma, image_urls: bool = False) -> tuple[str | list, list]:
    """A message's content for the chat template (a string, or parts with {"type": "image"} where images go) and
    its images, decoded: OpenAI's text parts and `image_url` parts with base64 `data:` URLs (or, with
    `image_urls`, http(s) URLs)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise ApiError(400, f"{where} must be a string or a list of content parts", param=where)
    parts, images = [], []
    for i, part in enumerate(content):
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif part.get("type") == "image_url":
            images.append(image_from_url(part.get("image_url"), f"{where}[{i}].image_url", model, image_urls))
            parts.append({"type": "image"})
        else:
            raise ApiError(400, f"{where}[{i}] must be a text part or an image_url part", param=f"{where}[{i}]")
    if not images:
        return "".join(p["text"] for p in parts), []
    return parts, images


def image_from_url(value, where: str, model: DiffusionGemma, fetch: bool = False):
    """A decoded image from an image_url part: a base64 data: URL, or with `fetch` an http(s) URL (off by default:
    a server that fetches URLs reaches whatever its network reaches on a client's behalf)."""
    import base64
    import binascii

    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise ApiError(400, f"{where} must be {{\"url\": \"data:image/...;base64,...\"}}", param=where)
    if url.startswith(("http://", "https://")) and fetch:
        raw = fetch_image(url, where)
    elif not url.startswith("data:"):
        raise ApiError(400, f"{where}: this server does not fetch image URLs; send the image inline as a base64 "
                       "data: URL (or start dg-serve with --allow-image-urls)", param=where)
    else:
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{where}: the data: URL must be base64 (data:image/png;base64,...)", param=where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: the data: URL's base64 does not decode", param=where) from None
    try:
        return model.open_images([raw])[0]
    except UserError as exc:
        raise ApiError(400, f"{where}: {exc}", param=where) from None


def fetch_image(url: str, where: str) -> bytes:
    """An image's bytes from an http(s) URL, within IMAGE_URL_TIMEOUT seconds and MAX_IMAGE_URL_BYTES; redirects
    only to http(s) (urllib would also follow one to ftp)."""
    import urllib.error
    import urllib.request

    class HttpRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, request, fp, code, message, headers, new_url):
            return super().redirect_request(request, fp, code, message, headers, new_url) if new_url.startswith(
                ("http://", "https://")) else None

    try:
        with urllib.request.build_opener(HttpRedirects).open(
                urllib.request.Request(url, headers={"User-Agent": "dg-serve"}), timeout=IMAGE_URL_TIMEOUT) as response:
            raw = response.read(MAX_IMAGE_URL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise ApiError(400, f"{where}: could not fetch {url} ({reason})", param=where) from None
    if len(raw) > MAX_IMAGE_URL_BYTES:
        raise ApiError(400, f"{where}: {url} is over {MAX_IMAGE_URL_BYTES >> 20} MB", param=where)
    return raw


def prompt_ids(body: dict, model: DiffusionGemma) -> list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
    if not prompt:
        raise ApiError(400, "prompt is empty; give some text to start from", param="prompt")
    return model.text.encode(prompt)


def stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", param="stop")
    return stops


def usage(request: Request, reply: TextStreamer, cached_tokens: int) -> dict:
    return {"prompt_tokens": len(request.ids), "completion_tokens": len(reply.tokens),
            "total_tokens": len(request.ids) + len(reply.tokens),
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def stats_object(stats, cached_tokens: int) -> dict:
    """DiffusionGemma's figures of a generation, under the extra `dg` field of the last response or chunk."""
    return {"blocks": stats.blocks, "steps_per_block": stats.steps_per_block,
            "tokens_per_forward": round(stats.tokens_per_forward, 3),
            "tokens_per_second": round(stats.tokens_per_second, 2), "prefill_ms": round(stats.prefill_ms, 2),
            "step_ms": round(stats.step_ms, 2), "canvas_computed": round(stats.canvas_computed, 3),
            "cached_tokens": cached_tokens}


def response(request: Request, model_id: str, reply: TextStreamer, usage_object: dict, dg: dict) -> dict:
    if request.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": reply.text},
                  "finish_reason": reply.finish_reason, "logprobs": None}
        kind, prefix = "chat.completion", "chatcmpl-"
    else:
        choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + request.id, "object": kind, "created": request.created, "model": model_id,
            "choices": [choice], "usage": usage_object, "dg": dg}


def chunk(request: Request, model_id: str, text: str | None = None, finish_reason: str | None = None,
          first: bool = False, choices: bool = True, **extra) -> dict:
    """One streamed chunk: a text delta (a choice), or with `choices=False` only the extra fields (usage, dg)."""
    if request.chat:
        delta = {"role": "assistant", "content": ""} if first else {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind, prefix = "chat.completion.chunk", "chatcmpl-"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind, prefix = "text_completion", "cmpl-"
    return {"id": prefix + request.id, "object": kind, "created": request.created, "model": model_id,
            "choices": [choice] if choices else [], **extra}
