"""transformers' DiffusionGemmaForBlockDiffusion as the oracle: what each graph output must equal.

Used by the export-time validation and by the tests, so both hold the graphs to the same definition.
"""

from unittest import mock

import numpy as np
import torch
from transformers import DynamicCache
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hf_generation

from dg_runtime import NoiseSource, Settings


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
def encode(model, cache: DynamicCache, input_ids: np.ndarray, start: int) -> np.ndarray:
    """Fill the cache; returns the LM head's logits after the last input ([B, V]) on the encoder's (normed) last
    hidden state: their argmax is the autoregressive next token."""
    positions = torch.arange(start, start + input_ids.shape[1])[None]
    hidden = model.model.encoder(input_ids=torch.from_numpy(input_ids), cache=cache, position_ids=positions)
    return model.lm_head(hidden.last_hidden_state[:, -1]).numpy()


def cache_arrays(cache: DynamicCache) -> list[np.ndarray]:
    return [t.numpy() for layer in cache.layers for t in (layer.keys, layer.values)]


@torch.no_grad()
def denoise(model, cache, canvas_ids, self_conditioning_logits, position_ids, temperature, uniform) -> dict:
    logits = model(
        decoder_input_ids=torch.from_numpy(canvas_ids),
        cache=cache,
        self_conditioning_logits=torch.from_numpy(self_conditioning_logits),
        decoder_position_ids=torch.from_numpy(position_ids),
    ).logits
    embed = model.model.decoder.embed_tokens
    return step_outputs(logits, embed.weight, embed.embed_scale, temperature, uniform)


@torch.no_grad()
def step_outputs(logits, embedding, embed_scale, temperature, uniform) -> dict:
    """What the graph outputs in a denoising step for a step's softcapped logits: the sampler's view of them (as
    transformers' generate computes it) and the next step's soft embedding (as its decoder computes it), in the
    logits' precision (float32 as transformers runs, or float64 for the reference validation judges against)."""
    logits = logits.to(embedding.dtype)  # transformers returns float32 logits from a float64 model too
    processed = logits / torch.tensor(temperature, dtype=logits.dtype)
    probs = processed.softmax(dim=-1, dtype=logits.dtype)
    outputs = {
        "argmax": processed.argmax(-1),
        "sampled": inverse_cdf_sample(probs, torch.from_numpy(uniform)),
        "entropy": torch.distributions.Categorical(logits=processed).entropy(),
        "next_soft_embedding": torch.matmul(probs, embedding) * embed_scale,
        "logits": logits,
    }
    return {name: value.numpy() for name, value in outputs.items()}


class DraftRecorder:
    """A transformers streamer that keeps each step's processed (tempered) logits; their argmax is the draft."""

    _takes_logits = True  # transformers then passes the step's processed logits to put_draft

    def __init__(self):
        self.logits = []

    def put_draft(self, logits):
        self.logits.append(logits.numpy().copy())

    def put(self, value):
        pass

    def end(self):
        pass


def probability_margin(logits: np.ndarray, row: int, position: int) -> float:
    """Top-1 minus top-2 probability of one position's tempered distribution."""
    z = logits[row, position].astype(np.float64)
    p = np.exp(z - z.max())
    top = np.sort(p / p.sum())[-2:]
    return float(top[1] - top[0])


def generate_with_noise(model, input_ids: np.ndarray, settings: Settings, noise: NoiseSource, **images):
    """transformers' generate, drawing its canvases, renoise tokens and samples from `noise` in the runtime's order.
    `images`: pixel_values, image_position_ids and mm_token_type_ids, as its processor makes them.

    Returns the generated tokens [B, blocks * canvas] and the DraftRecorder (every step's processed logits).
    """
    def initialize_canvas(sampler, batch_size, device):
        return torch.from_numpy(noise.tokens((batch_size, sampler.canvas_length), sampler.vocab_size))

    def multinomial(probs, num_samples):
        return inverse_cdf_sample(probs, torch.from_numpy(noise.uniforms((probs.shape[0],))))[:, None]

    recorder = DraftRecorder()
    with mock.patch.object(hf_generation.EntropyBoundSampler, "initialize_canvas", initialize_canvas), \
            mock.patch.object(torch, "multinomial", multinomial):
        out = model.generate(
            torch.from_numpy(input_ids), streamer=recorder,
            max_new_tokens=settings.max_new_tokens, max_denoising_steps=settings.max_denoising_steps,
            sampler_config=hf_generation.EntropyBoundSamplerConfig(entropy_bound=settings.entropy_bound),
            t_max=settings.t_max, t_min=settings.t_min, stability_threshold=settings.stability_threshold,
            confidence_threshold=settings.confidence_threshold,
            **{name: torch.from_numpy(value) for name, value in images.items()},
        )
    return out.sequences[:, input_ids.shape[1]:].numpy(), recorder
