"""One loaded model shared by several threads gives each thread what a serial run gives, on both backends."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dg_runtime import DiffusionGemma, Settings


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_eight_threads_share_one_model(exported, backend):
    _, artifact = exported("window8-top2", confident=True)
    model = DiffusionGemma(artifact, backend=backend)
    settings = Settings(max_new_tokens=48, max_denoising_steps=6)
    prompts = [[5 + seed, 6, 7 + seed] for seed in range(8)]
    serial = [model.generate([prompt], settings=settings, seed=seed).tokens for seed, prompt in enumerate(prompts)]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda args: model.generate([args[1]], settings=settings, seed=args[0]).tokens,
                                 enumerate(prompts)))
    for seed, (a, b) in enumerate(zip(serial, threaded)):
        assert np.array_equal(a, b), seed
