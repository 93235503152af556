"""transformers' DiffusionGemmaForBlockDiffusion as the oracle: what each graph output must equal.

Used by the export-time validation and by the tests, so both hold the graphs to the same definition.
"""

import numpy as np
import torch
from transformers import DynamicCache


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds `uniform` (the graph's sampler, and the tests' stand-in for multinomial)."""
    below = (torch.cumsum(probs, dim=-1) <= uniform[..., None]).sum(-1)
    return below.clamp(max=probs.shape[-1] - 1)


@torch.no_grad()
def soft_embedding(model, logits: torch.Tensor) -> torch.Tensor:
    """The self-conditioning input computed from (processed) logits, as transformers' decoder does."""
    embed = model.model.decoder.embed_tokens
    return torch.matmul(logits.softmax(dim=-1, dtype=torch.float32), embed.weight) * embed.embed_scale


@torch.no_grad()
def encode(model, cache: DynamicCache, input_ids: np.ndarray, start: int) -> None:
    positions = torch.arange(start, start + input_ids.shape[1])[None]
    model.model.encoder(input_ids=torch.from_numpy(input_ids), past_key_values=cache, position_ids=positions)


def cache_arrays(cache: DynamicCache) -> list[np.ndarray]:
    return [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]


@torch.no_grad()
def denoise(model, cache, canvas_ids, self_conditioning_logits, position_ids, temperature, uniform) -> dict:
    logits = model(
        decoder_input_ids=torch.from_numpy(canvas_ids),
        past_key_values=cache,
        self_conditioning_logits=torch.from_numpy(self_conditioning_logits),
        decoder_position_ids=torch.from_numpy(position_ids),
    ).logits
    processed = logits / torch.tensor(temperature, dtype=torch.float32)
    probs = processed.softmax(dim=-1, dtype=torch.float32)
    outputs = {
        "argmax": processed.argmax(-1),
        "sampled": inverse_cdf_sample(probs, torch.from_numpy(uniform)),
        "entropy": torch.distributions.Categorical(logits=processed).entropy(),
        "next_soft_embedding": soft_embedding(model, processed),
        "logits": logits,
    }
    return {name: value.numpy() for name, value in outputs.items()}
