"""Chat: a later turn encodes only its new tokens, gives what a fresh render of the whole conversation gives, and
an interrupted turn leaves the conversation as it was."""

from contextlib import nullcontext

import numpy as np
import pytest

from dg_runtime import Chat, Done, Draft, TextDelta, load

SHOUT = "shout: " + "abcdefghijklmnopqrstuvwxyzabcdefghijklmn"  # the demo answers it in two canvases


@pytest.fixture(scope="module")
def model(demo_artifact):
    return load(demo_artifact)


def fresh_reply(model, messages, text, seed):
    """The reply to `text` after `messages`, from the whole conversation rendered by the template and encoded at once."""
    ids = model.text.chat_ids([*messages, {"role": "user", "content": text}])
    return model.text.decode(model.reply(model.generate([ids], seed=seed).tokens[0]))


def test_later_turns_equal_a_fresh_render_of_the_conversation(model):
    chat = Chat(model, system="be brief")
    assert chat.send("greet: alice", seed=3) == "hello alice, nice to meet you"
    encoded = chat.cache.length
    assert encoded > 0
    events = list(chat.stream(SHOUT, seed=4))
    assert isinstance(events[-1], Done) and events[-1].text == SHOUT.split(": ")[1].upper()
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == events[-1].text
    assert chat.cache.length > encoded  # only the new turn was encoded
    assert chat.send("upper: sunshine", seed=5) == fresh_reply(model, chat.messages[:-2], "upper: sunshine", 5)
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"] * 1 + ["user", "assistant"] * 2


@pytest.mark.parametrize("interrupt", ["close after the first block", "exception mid-block"])
def test_an_interrupted_turn_is_rolled_back(model, interrupt):
    chat = Chat(model)
    chat.send("greet: alice", seed=1)
    messages, length = list(chat.messages), chat.cache.length
    events = chat.stream(SHOUT, seed=2)
    with pytest.raises(RuntimeError) if interrupt.startswith("exception") else nullcontext():
        for event in events:
            if isinstance(event, Draft) and event.block == 1:  # the first block is in the cache by now
                if interrupt.startswith("exception"):
                    raise RuntimeError("the app's stop button")
                events.close()
    assert chat.messages == messages and chat.cache.length == length
    restored = Chat(model, messages=chat.messages)
    assert chat.send("upper: sunshine", seed=7) == restored.send("upper: sunshine", seed=7) == "SUNSHINE"
    assert chat.messages == restored.messages


def test_a_chat_starts_from_a_given_history(model):
    history = [{"role": "user", "content": "greet: alice"}, {"role": "assistant", "content": "hello alice"}]
    chat = Chat(model, messages=history)
    assert chat.send("next: abcdefgh", seed=0) == fresh_reply(model, history, "next: abcdefgh", 0)
    with pytest.raises(Exception, match=r"messages\[0\] must be"):
        Chat(model, messages=[{"role": "wizard", "content": "hi"}])


def test_no_new_tokens_on_a_filled_cache(model):
    """The canvas may follow the cache alone: the same as encoding the last prompt token with the generation."""
    ids = np.array([model.text.chat_ids([{"role": "user", "content": "greet: alice"}])])
    whole = model.generate(ids, seed=9)
    cache = model.new_cache()
    model.graph.encode(cache, ids)
    assert np.array_equal(model.generate(ids[:, :0], cache=cache, seed=9).tokens, whole.tokens)
