"""dg-serve on the demo artifact, through the official `openai` client and raw HTTP: answers equal
`DiffusionGemma.generate` with the same seed, streamed or not, cold or from the prefix cache; bad input gets the
right status and an OpenAI error object; a full queue answers 503; a client that goes away cancels its generation."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from openai import OpenAI

from conftest import serving
from dg_runtime import DiffusionGemma
from dg_runtime.kv_cache import KVCache
from dg_serve.cli import bind
from dg_serve.cli import main as dg_serve
from dg_serve.prefix_cache import PrefixCache

PROMPTS = ["greet: alice", "upper: kqztabcd", "next: abcdefgh", "shout: " + "abcdefghij" * 4]


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def model(request, demo_artifact):
    return DiffusionGemma(demo_artifact, backend=request.param)


@pytest.fixture(scope="module")
def url(model):
    with serving(model) as base:
        yield base


def expected_reply(model, ids, seed, settings=None) -> tuple[str, int]:
    done = model.generate([ids], settings=settings or model.defaults, seed=seed)
    reply = model.reply(done.tokens[0])
    return model.text.decode(reply), len(reply)


def chat_ids(model, text):
    return model.text.chat_ids([{"role": "user", "content": text}])


def test_chat_answers_equal_generate(model, url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    for seed, prompt in enumerate(PROMPTS):
        answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                                seed=seed)
        text, tokens = expected_reply(model, chat_ids(model, prompt), seed)
        assert answer.choices[0].message.content == text
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage.prompt_tokens == len(chat_ids(model, prompt))
        assert answer.usage.completion_tokens == tokens


def test_streamed_chat_equals_generate(model, url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = PROMPTS[3]  # two canvases: text arrives in two pieces
    chunks = list(client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": prompt}], seed=3, stream=True,
        stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text, tokens = expected_reply(model, chat_ids(model, prompt), 3)
    assert "".join(pieces) == text and len(pieces) == 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == tokens
    stats = [c.model_extra["dg"]["stats"] for c in chunks if c.model_extra.get("dg")]
    assert stats[0]["blocks"] == 2 and len(stats[0]["steps_per_block"]) == 2


def test_streamed_canvas_shows_every_step(model, url):
    body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "stream": True, "stream_canvas": True, "seed": 0}
    chunks = sse_chunks(httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60))
    canvases = [c["dg"]["canvas"] for c in chunks if "canvas" in c.get("dg", {})]
    stats = next(c["dg"]["stats"] for c in chunks if "stats" in c.get("dg", {}))
    assert [c["step"] for c in canvases] == list(range(1, stats["steps_per_block"][0] + 1))
    assert all(len(c["tokens"]) == model.canvas_length == len(c["accepted"]) for c in canvases)


def sse_chunks(response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_completions_and_extra_settings(model, url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = model.text.render([{"role": "user", "content": PROMPTS[1]}])
    answer = client.completions.create(model="demo", prompt=prompt, seed=5, extra_body={"steps": 1})
    settings = model.defaults.with_overrides(max_denoising_steps=1)
    assert answer.choices[0].text == expected_reply(model, model.text.encode(prompt), 5, settings)[0]
    assert answer.model_extra["dg"]["stats"]["steps_per_block"] == [1]
    fast = {"fast": True, "freeze_after": 1, "steps": 8, "stability_threshold": 8}
    answer = client.completions.create(model="demo", prompt=prompt, seed=5, extra_body=fast)
    settings = model.defaults.with_overrides(max_denoising_steps=8, stability_threshold=8, fast=True, freeze_after=1)
    assert answer.choices[0].text == expected_reply(model, model.text.encode(prompt), 5, settings)[0]
    assert "canvas_computed" in answer.model_extra["dg"]["stats"]


def test_stop_strings_and_max_tokens(model, url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = [{"role": "user", "content": "greet: alice"}]
    full = client.chat.completions.create(model="demo", messages=messages, seed=0).choices[0].message.content
    assert full.startswith("hello alice")
    stopped = client.chat.completions.create(model="demo", messages=messages, seed=0, stop=["alice", "zzz"])
    assert stopped.choices[0].message.content == "hello " and stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="demo", messages=messages, seed=0, max_tokens=5)
    assert short.choices[0].message.content == "hello" and short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 5
    streamed = client.chat.completions.create(model="demo", messages=messages, seed=0, stop="ali", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "hello "


def test_a_later_turn_reuses_the_cache_and_answers_as_a_cold_run(model, url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    first = [{"role": "user", "content": "upper: abcdefgh"}]
    reply = client.chat.completions.create(model="demo", messages=first, seed=1).choices[0].message.content
    second = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "greet: bruno"}]
    answer = client.chat.completions.create(model="demo", messages=second, seed=2)
    assert answer.usage.prompt_tokens_details.cached_tokens == len(model.text.chat_ids(first))
    assert answer.choices[0].message.content == expected_reply(model, model.text.chat_ids(second), 2)[0]


def test_eight_concurrent_streams_answer_as_serial_runs(model, url):
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")

    def streamed(seed):
        prompt = PROMPTS[seed % len(PROMPTS)]
        chunks = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": prompt}],
                                                seed=seed, stream=True, extra_body={"stream_canvas": True})
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(streamed, range(8)))
    assert answers == [expected_reply(model, chat_ids(model, PROMPTS[s % len(PROMPTS)]), s)[0] for s in range(8)]


LONG = 5000  # tokens: beyond the demo model's 4,096 positions
HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [  # name, body, status, param, words of the message
    ("malformed JSON", b'{"messages": [', 400, None, "not valid JSON"),
    ("not an object", b"[1, 2]", 400, None, "must be a JSON object"),
    ("missing messages", {"model": "demo"}, 400, "messages", "messages must be a non-empty list"),
    ("empty messages", {"messages": []}, 400, "messages", "messages must be a non-empty list"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "'wizard'"),
    ("non-string content", {"messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content",
     "must be a string"),
    ("max_tokens 0", {"messages": HI, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("max_tokens past the positions", {"messages": HI, "max_tokens": 10**6}, 400, "messages", "lower max_tokens"),
    ("prompt too long", {"messages": [{"role": "user", "content": "a" * 5000}]}, 400, "messages", "shorten the prompt"),
    ("unknown model", {"model": "gpt-9", "messages": HI}, 404, "model", "'gpt-9' does not exist"),
    ("n of 2", {"messages": HI, "n": 2}, 400, "n", "n must be 1"),
    ("bad steps", {"messages": HI, "steps": "many"}, 400, "steps", "steps must be a whole number"),
    ("bad temperatures", {"messages": HI, "t_min": 0.9, "t_max": 0.5}, 400, "t_min", "t_min < t_max"),
    ("bad seed", {"messages": HI, "seed": -1}, 400, "seed", "seed must be"),
    ("bad stop", {"messages": HI, "stop": [1]}, 400, "stop", "stop must be"),
    ("body over the limit", b'{"messages": "' + b"a" * (2 << 20) + b'"}', 413, None, "over 1048576 bytes"),
]


@pytest.mark.parametrize("name,body,status,param,words", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_requests_get_an_openai_error(url, name, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"] and error["param"] == param
    assert "Traceback" not in response.text
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_unknown_paths_and_methods(url):
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    response = httpx.get(f"{url}/v1/chat/completions")
    assert response.status_code == 405 and response.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "demo"


def test_api_key(model):
    with serving(model, api_key="s3cret") as base:
        body = {"messages": [{"role": "user", "content": "greet: alice"}], "max_tokens": 4}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.post(f"{base}/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/health").status_code == 200 and httpx.get(base).status_code == 200
        client = OpenAI(base_url=f"{base}/v1", api_key="s3cret")
        assert client.chat.completions.create(model="demo", messages=body["messages"]).choices[0].message.content


class Gated:
    """The model, but each generation waits for the gate before its first step."""

    def __init__(self, model):
        self.model, self.gate = model, threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def stream(self, *args, **kwargs):
        self.gate.wait()
        yield from self.model.stream(*args, **kwargs)


def test_a_full_queue_answers_503_with_retry_after(model):
    gated = Gated(model)
    body = {"messages": [{"role": "user", "content": "greet: alice"}], "seed": 0}
    with serving(gated, queue_size=1) as base, ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=60)
        wait_for(lambda: httpx.get(f"{base}/health").json()["running"])
        queued = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=60)
        wait_for(lambda: httpx.get(f"{base}/health").json()["queued"] == 1)
        refused = httpx.post(f"{base}/v1/chat/completions", json=body)
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        gated.gate.set()
        assert running.result().status_code == queued.result().status_code == 200


def wait_for(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_client_that_goes_away_cancels_its_generation(model):
    # Never stable: every block takes all 48 steps, ~60 blocks in all, unless cancelled.
    body = {"messages": [{"role": "user", "content": "greet: alice"}], "stream": True, "stream_canvas": True,
            "max_tokens": 2000, "steps": 48, "stability_threshold": 10**6}
    with serving(model) as base:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if "canvas" in line)
        wait_for(lambda: httpx.get(f"{base}/health").json()["cancelled"] == 1)
        health = httpx.get(f"{base}/health").json()
        assert not health["running"] and health["served"] == 0
        answer = httpx.post(f"{base}/v1/chat/completions", json={"messages": body["messages"]}, timeout=60)
        assert answer.status_code == 200


def test_prefix_cache_keeps_the_longest_prefix_within_its_budget():
    layout = [{"type": "full_attention", "kv_heads": 1, "head_dim": 4}]

    def cache_of(tokens):
        cache = KVCache(layout, 8, 1)
        cache.append([np.full((1, 1, len(tokens), 4), float(len(tokens)), np.float32)] * 2, len(tokens))
        return cache

    per_token = 2 * 4 * 4
    prefixes = PrefixCache(max_bytes=10 * per_token)
    prefixes.add([1, 2], cache_of([1, 2]))
    prefixes.add([1, 2, 3, 4], cache_of([1, 2, 3, 4]))
    cache, length, images = prefixes.longest_prefix([1, 2, 3, 4, 5])
    assert length == 4 and cache.length == 4 and images == 0
    assert prefixes.longest_prefix([1, 2, 3, 4])[1] == 2  # at least one token is left to encode
    assert prefixes.longest_prefix([9, 1, 2])[1] == 0
    cache.append([np.zeros((1, 1, 1, 4), np.float32)] * 2, 1)  # a copy: the stored one is unchanged
    assert prefixes.longest_prefix([1, 2, 3, 4, 5])[0].length == 4
    prefixes.add([7, 7, 7, 7, 7], cache_of([7] * 5))  # over the budget: the least recently used goes
    assert prefixes.bytes <= 10 * per_token and prefixes.longest_prefix([1, 2, 3])[1] == 0


def test_prefix_cache_matches_images_by_their_pixels():
    """Image tokens are the same ids whatever the image: a kept sequence with images matches only the same images,
    and says how many of the prompt's images it holds."""
    layout = [{"type": "full_attention", "kv_heads": 1, "head_dim": 4}]
    cache = KVCache(layout, 8, 1)
    cache.append([np.zeros((1, 1, 3, 4), np.float32)] * 2, 3)
    prefixes = PrefixCache(max_bytes=1 << 20)
    prefixes.add([5, 9, 9], cache, ("cat",))
    assert prefixes.longest_prefix([5, 9, 9, 6], ("cat",))[1:] == (3, 1)
    assert prefixes.longest_prefix([5, 9, 9, 6, 9, 9], ("cat", "dog"))[1:] == (3, 1)
    assert prefixes.longest_prefix([5, 9, 9, 6], ("dog",))[1:] == (0, 0)


@pytest.mark.parametrize("args,message", [
    (["missing.dg"], "does not exist"),
    (["{demo}", "--port", "70000"], "--port must be between"),
    (["{demo}", "--queue-size", "0"], "--queue-size must be at least 1"),
    (["{demo}", "--threads", "0"], "threads must be at least 1"),
])
def test_cli_bad_options(demo_artifact, capsys, args, message):
    assert dg_serve([a.format(demo=demo_artifact) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dg-serve: error:") and message in err and err.count("\n") == 1


def test_cli_says_when_the_port_is_taken(demo_artifact, capsys):
    taken = bind("127.0.0.1", 0)
    taken.listen()
    assert dg_serve([str(demo_artifact), "--port", str(taken.getsockname()[1])]) == 2
    assert "is in use; choose another with --port" in capsys.readouterr().err
    taken.close()
