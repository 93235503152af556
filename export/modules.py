"""Export-friendly forwards of DiffusionGemma's text path.

transformers' modules cannot be traced as they are: attention reads and writes a `Cache` object, and the
experts use a data-dependent Python loop (or `grouped_mm`). These wrappers keep transformers' own submodules
(projections, norms, rotary embedding, dense MLP, router, self-conditioning block) and their parameters, and
replace only the two untraceable parts:

- attention takes the past keys/values as explicit tensors and builds its mask from positions;
- the routed experts run as one unrolled block per expert: the tokens routed to it are found with nonzero,
  gathered, sent through its GeGLU and scatter-added back with their routing weight.

Both graphs are built on the *same* parameter objects, so the tied weights are stored once.
"""

import torch
from torch import nn


def project_qkv(attn, hidden_states, cos, sin):
    """Query, key and value for new tokens, as transformers' attention computes them ([B, heads, T, D])."""
    hidden_shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
    query = attn.q_norm(attn.q_proj(hidden_states).view(hidden_shape))
    query = _rotate(query, cos, sin).transpose(1, 2)
    raw_key = attn.k_proj(hidden_states).view(hidden_shape)
    # Full-attention layers have no v_proj: their values are the (unscaled-normed) keys.
    raw_value = attn.v_proj(hidden_states).view(hidden_shape) if attn.v_proj is not None else raw_key
    key = _rotate(attn.k_norm(raw_key), cos, sin).transpose(1, 2)
    value = attn.v_norm(raw_value).transpose(1, 2)
    return query, key, value


def _rotate(x, cos, sin):
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attend(attn, query, key, value, mask):
    """Scaled dot-product attention with grouped KV heads; scaling is 1.0 in DiffusionGemma (the q/k norms scale)."""
    groups = attn.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * attn.scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2)
    return attn.o_proj(output.reshape(*output.shape[:2], -1))


def routed_experts(experts, hidden_states, top_k_index, top_k_weights):
    """transformers' DiffusionGemmaTextExperts, unrolled over experts so that it traces to standard ops.

    Each expert only computes the tokens routed to it (nonzero + gather), so the cost is the sparse top-k cost,
    and contributions are added in expert order, as transformers does.
    """
    output = torch.zeros_like(hidden_states)
    for expert in range(experts.num_experts):
        hit = top_k_index == expert  # [T, K]; a token picks an expert at most once
        token_idx = torch.nonzero(hit.any(dim=-1)).squeeze(-1)
        weight = (top_k_weights * hit.to(top_k_weights.dtype)).sum(dim=-1)[token_idx]
        gate, up = nn.functional.linear(hidden_states[token_idx], experts.gate_up_proj[expert]).chunk(2, dim=-1)
        expert_out = nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[expert])
        output = output.index_add(0, token_idx, expert_out * weight[:, None])
    return output


def text_layer(layer, hidden_states, cos, sin, past_key, past_value, mask):
    """One DiffusionGemma text layer (encoder or decoder: same math) with explicit KV.

    Returns the layer output and the keys/values of the new tokens.
    """
    residual = hidden_states
    query, key, value = project_qkv(layer.self_attn, layer.input_layernorm(hidden_states), cos, sin)
    attended = attend(
        layer.self_attn, query, torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2), mask
    )
    hidden_states = residual + layer.post_attention_layernorm(attended)

    residual = hidden_states
    dense = layer.post_feedforward_layernorm_1(layer.mlp(layer.pre_feedforward_layernorm(hidden_states)))
    flat = residual.reshape(-1, residual.shape[-1])
    _, top_k_weights, top_k_index = layer.router(flat)
    routed = routed_experts(layer.experts, layer.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
    routed = layer.post_feedforward_layernorm_2(routed.reshape(residual.shape))
    hidden_states = residual + layer.post_feedforward_layernorm(dense + routed)
    return hidden_states * layer.layer_scalar, key, value


class Encoder(nn.Module):
    """Causal encoder: new tokens + the cached KV -> the KV of the new tokens, for every layer.

    A sliding layer's past holds the tokens just before the new ones (the runtime keeps the last window-1);
    a full layer's past holds them all. Key positions are rebuilt from the first new position and the past length,
    so one graph serves the prefill, a committed block and a later chat turn.
    """

    def __init__(self, model):
        super().__init__()
        text = model.model.encoder.language_model
        self.embed_tokens = text.embed_tokens
        self.layers = text.layers
        self.rotary_emb = text.rotary_emb
        self.layer_types = text.config.layer_types
        self.sliding_window = text.config.sliding_window

    def forward(self, input_ids, position_ids, *past):
        hidden_states = self.embed_tokens(input_ids)
        rope = {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(self.layer_types)}
        presents = []
        for i, layer in enumerate(self.layers):
            past_key, past_value = past[2 * i], past[2 * i + 1]
            mask = self._causal_mask(position_ids, past_key.shape[2], self.layer_types[i] == "sliding_attention")
            hidden_states, key, value = text_layer(layer, hidden_states, *rope[self.layer_types[i]], past_key, past_value, mask)
            presents += [key, value]
        return tuple(presents)

    def _causal_mask(self, position_ids, past_length, sliding):
        past_positions = position_ids[:, :1] - past_length + torch.arange(past_length, device=position_ids.device)
        key_positions = torch.cat([past_positions, position_ids], dim=1)[:, None, None, :]
        query_positions = position_ids[:, None, :, None]
        mask = key_positions <= query_positions
        if sliding:
            mask = mask & (key_positions > query_positions - self.sliding_window)
        return mask


class Denoiser(nn.Module):
    """One denoising step over the whole canvas, with the vocabulary-sized work kept inside the graph.

    Inputs: canvas ids, the soft embedding from the previous step (zeros on the first), canvas positions, the
    step's temperature, one uniform number per position for sampling, and the prompt KV (read only).
    Outputs, all [B, L] but the last two: the argmax canvas, a token sampled by inverse CDF from the tempered
    distribution, each position's entropy, the next step's soft embedding [B, L, H], and the softcapped logits
    [B, L, V] (for validation; the runtime does not fetch them).
    """

    def __init__(self, model):
        super().__init__()
        decoder = model.model.decoder
        self.embed_tokens = decoder.embed_tokens
        self.layers = decoder.layers
        self.rotary_emb = decoder.rotary_emb
        self.self_conditioning = decoder.self_conditioning
        self.norm = decoder.norm
        self.lm_head = model.lm_head
        self.softcap = model.final_logit_softcapping
        self.layer_types = decoder.text_config.layer_types

    def forward(self, canvas_ids, soft_embedding, position_ids, temperature, sample_uniform, *past):
        hidden_states = self.self_conditioning(self.embed_tokens(canvas_ids), soft_embedding)
        rope = {t: self.rotary_emb(hidden_states, position_ids, t) for t in set(self.layer_types)}
        for i, layer in enumerate(self.layers):
            # The canvas sees every cached key and itself, bidirectionally: no mask.
            hidden_states, _, _ = text_layer(
                layer, hidden_states, *rope[self.layer_types[i]], past[2 * i], past[2 * i + 1], None
            )
        logits = self.lm_head(self.norm(hidden_states)).float()
        logits = torch.tanh(logits / self.softcap) * self.softcap

        tempered = logits / temperature
        log_probs = torch.log_softmax(tempered, dim=-1)
        probs = log_probs.exp()
        entropy = -(probs * log_probs.clamp(min=torch.finfo(log_probs.dtype).min)).sum(-1)
        argmax = tempered.argmax(-1)
        below = (torch.cumsum(probs, dim=-1) <= sample_uniform[..., None]).sum(-1)
        sampled = below.clamp(max=logits.shape[-1] - 1)
        next_soft_embedding = torch.matmul(probs, self.embed_tokens.weight) * self.embed_tokens.embed_scale
        return argmax, sampled, entropy, next_soft_embedding, logits
