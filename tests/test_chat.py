"""A later chat turn encodes only its new tokens and gives what re-encoding the whole history gives."""

import numpy as np

from dg_runtime import Chat, DiffusionGemma, Settings
from dg_runtime.generate import trim_reply


def test_second_turn_reuses_the_cache(exported):
    _, artifact = exported("window8-top2", confident=True)
    model = DiffusionGemma(artifact)
    settings = Settings(max_new_tokens=2 * model.canvas_length, max_denoising_steps=6, t_max=0.3, t_min=0.1)
    chat = Chat(model, settings=settings)
    first = list(chat.stream("Hello there", seed=3))[-1]
    encoded_after_first = chat.cache.length
    second = list(chat.stream("And again?", seed=4))[-1]

    reply = trim_reply(first.tokens[0], model.eos_ids, model.pad_id)
    history = (model.text.chat_ids([{"role": "user", "content": "Hello there"}]) + reply.tolist()
               + model.text.continuation_ids(chat.messages[:2], {"role": "user", "content": "And again?"}))
    fresh = model.generate([history], settings, seed=4)
    assert np.array_equal(second.tokens, fresh.tokens)
    assert encoded_after_first > 0  # the first turn's prompt (and any committed blocks) stayed cached
