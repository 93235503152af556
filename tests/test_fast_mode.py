"""Fast mode: settled positions freeze and later steps compute only the others. What it rests on is checked
exactly (frozen positions' keys and values as part of the past give the other positions the outputs of a whole-canvas
run); what it changes is opt-in and measured elsewhere (bench/fast_mode.py)."""

import numpy as np
import pytest

from dg_runtime import Draft, Settings, SettingError, load
from dg_runtime.backends import open_graph
from dg_runtime.graph import STEP_OUTPUTS, ModelGraph
from dg_runtime.kv_cache import KVCache


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_frozen_positions_join_the_past(exported, backend):
    _, artifact = exported("gqa-window12", confident=True)
    model = load(artifact, backend=backend, precision="f32" if backend == "openvino" else None)
    graph, rng = model.graph, np.random.default_rng(0)
    cache = model.new_cache(1)
    graph.encode(cache, rng.integers(5, model.vocab_size, (1, 20)))  # longer than the sliding window
    canvas = model.canvas_length
    ids = rng.integers(0, model.vocab_size, (1, canvas))
    soft = rng.standard_normal((1, canvas, model.hidden_size)).astype(np.float32)
    positions = np.arange(cache.length, cache.length + canvas)[None]
    t, uniform = np.array(0.6, np.float32), rng.random((1, canvas), dtype=np.float32)
    whole = graph.run([*STEP_OUTPUTS, *graph.present_names], graph.denoiser_feeds(cache, ids, soft, positions, t, uniform))
    frozen = rng.random(canvas) < 0.7
    active = np.flatnonzero(~frozen)
    feeds = graph.denoiser_feeds(cache, ids[:, active], soft[:, active], positions[:, active], t, uniform[:, active])
    for name, present in zip(graph.present_names, whole[len(STEP_OUTPUTS):]):
        past = name.replace("present.", "past.")
        feeds[past] = np.concatenate([feeds[past], present[:, :, frozen]], axis=2)
    part = graph.run(STEP_OUTPUTS, feeds)
    for name, full, subset in zip(STEP_OUTPUTS, whole, part):
        if name in ("argmax", "sampled"):
            assert np.array_equal(full[:, active], subset), name
        else:
            assert np.allclose(full[:, active], subset, atol=2e-5, rtol=1e-5), (name, np.abs(full[:, active] - subset).max())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fast_mode_freezes_and_computes_less(exported, backend):
    _, artifact = exported("window8-top2", confident=True)
    model = load(artifact, backend=backend)
    settings = Settings(max_new_tokens=2 * model.canvas_length, max_denoising_steps=16, entropy_bound=1.0,
                        t_max=0.5, t_min=0.1, stability_threshold=16, fast=True)
    for seed in range(3):
        done = model.generate([[5, 6, 7, 8, 9]], settings=settings, seed=seed)
        assert 0 < done.stats.canvas_computed < 1, done.stats
        assert done.tokens.shape[1] <= settings.max_new_tokens and (done.tokens < model.vocab_size).all()
    exact = model.generate([[5, 6, 7, 8, 9]], settings=Settings(**{**vars(settings), "fast": False}), seed=0)
    assert exact.stats.canvas_computed == 1


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_position_whose_argmax_held_keeps_it(exported, backend):
    _, artifact = exported("window8-top2", confident=True)
    model = load(artifact, backend=backend)
    settings = Settings(max_new_tokens=model.canvas_length, max_denoising_steps=16, entropy_bound=1.0, t_max=0.5,
                        t_min=0.1, stability_threshold=16, fast=True, freeze_after=2)
    for seed in range(3):
        drafts = np.array([e.canvas[0] for e in model.stream([[5, 6, 7, 8, 9]], settings=settings, seed=seed)
                           if isinstance(e, Draft)])
        held = np.r_[np.zeros((1, drafts.shape[1]), bool), drafts[1:] == drafts[:-1]]  # same as the step before
        first = np.where(held.any(axis=0), held.argmax(axis=0), len(drafts))
        assert (first < len(drafts) - 1).any()  # some froze before the end
        for position in np.flatnonzero(first < len(drafts)):
            assert (drafts[first[position]:, position] == drafts[first[position], position]).all(), (seed, position)


def test_fast_mode_is_refused_where_it_cannot_apply(exported):
    _, artifact = exported("window8-top2", confident=True)
    model = load(artifact)
    with pytest.raises(SettingError, match="fast mode generates one row at a time"):
        model.generate([[5, 6], [7, 8]], settings=Settings(fast=True))
    with pytest.raises(SettingError, match="freeze_after must be at least 1"):
        Settings(fast=True, freeze_after=0).check()
