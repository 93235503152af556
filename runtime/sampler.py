"""The numpy half of a denoising step: what transformers' EntropyBoundSampler and
StableAndConfidentStoppingCriteria do with the [B, L] results a denoising step of the graph returns."""

import numpy as np


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Linear schedule; `step` counts down from max_steps (t_max) to 1."""
    return t_min + (t_max - t_min) * (step / max_steps)


def entropy_bound_accept(entropy: np.ndarray, entropy_bound: float) -> np.ndarray:
    """Accept the k lowest-entropy positions with sum(H_1..k) - H_k <= bound (positions sorted ascending)."""
    order = np.argsort(entropy, axis=-1, kind="stable")
    sorted_entropy = np.take_along_axis(entropy, order, axis=-1)
    # transformers' CPU cumsum accumulates float32 in double; do the same so the boundary falls alike.
    cumulative = np.cumsum(sorted_entropy, axis=-1, dtype=np.float64).astype(np.float32)
    selected = cumulative - sorted_entropy <= np.float32(entropy_bound)
    accepted = np.zeros_like(selected)
    np.put_along_axis(accepted, order, selected, axis=-1)
    return accepted


class StableAndConfident:
    """Stop a row once its argmax canvas repeated for `stability_threshold` steps and its mean entropy is low."""

    def __init__(self, stability_threshold: int, confidence_threshold: float, shape: tuple):
        self.confidence_threshold = np.float32(confidence_threshold)
        self.history = np.full((stability_threshold, *shape), -1, dtype=np.int64)

    def __call__(self, argmax: np.ndarray, entropy: np.ndarray) -> np.ndarray:
        if len(self.history) == 0:
            stable = np.ones(argmax.shape[0], dtype=bool)
        else:
            stable = (self.history == argmax[None]).all(axis=-1).all(axis=0)
            self.history = np.roll(self.history, -1, axis=0)
            self.history[-1] = argmax
        return stable & (entropy.mean(axis=-1) < self.confidence_threshold)


def finalize_block(block: np.ndarray, finished: np.ndarray, eos_ids: list[int], pad_id: int | None):
    """Commit a block: rows finished earlier become pad; in rows that hit EOS, tokens after it become pad."""
    is_eos = np.isin(block, eos_ids)
    now_finished = finished | is_eos.any(axis=-1)
    block = block.copy()
    if pad_id is not None:
        block[finished] = pad_id
        eos_count = np.cumsum(is_eos, axis=-1)
        block[(eos_count > 0) & ~((eos_count == 1) & is_eos)] = pad_id
    return block, now_finished
