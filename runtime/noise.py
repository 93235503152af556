"""All the randomness of a generation, drawn in one fixed order from one seeded generator.

The loop asks for: the initial canvas of each block, then per step the sampling uniforms and the renoise
tokens. Tests hand the same object to transformers' `generate` (patching its canvas initialiser and its
multinomial), so both sides consume identical noise.
"""

import numpy as np


class NoiseSource:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def tokens(self, shape: tuple, vocab_size: int) -> np.ndarray:
        """Uniform random token ids: a fresh canvas, or the renoise candidates of a step."""
        return self.rng.integers(0, vocab_size, shape, dtype=np.int64)

    def uniforms(self, shape: tuple) -> np.ndarray:
        """One U[0, 1) per position; the denoiser samples a token by inverse CDF with it."""
        return self.rng.random(shape, dtype=np.float32)
