"""The guide models' forward pass, as plain functions over a Hugging Face Llama-family model.

A guide forward extends rows that already have a prefix in the KV pool by a few new tokens.
The new tokens attend to their row's cached prefix and, among themselves, to whatever `new_mask`
allows: a causal mask extends a row by a run of tokens, the identity mask scores k sibling
candidates against one shared prefix in a single pass (the tree trick that makes ARGS cheap).

Only the attention is ours; norms, projections, rotary embeddings and MLPs are the model's own
modules, so weights are never copied and the maths matches transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# Pre-norm decoders whose layers read `self_attn.{q,k,v,o}_proj`, `mlp`, `input_layernorm`,
# `post_attention_layernorm`, with optional q/k norms (Qwen3) and projection biases (Qwen2).
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def unsupported_reason(config) -> str | None:
    """Why the cached path cannot run this architecture, or None when it can."""
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}"
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding or (config.model_type == "mistral" and getattr(config, "sliding_window", None)):
        return "sliding-window attention is not supported by the cached path"
    return None


@dataclass
class PrefixKV:
    """Per-layer cached keys/values of the rows in a batch: [rows, kv_heads, T, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: torch.Tensor  # [rows] valid prefix length of each row


def attend(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    prefix_lengths: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention of the new queries over [cached prefix ; new tokens], without concatenating caches.

    q: [B, H, Q, D]; k/v_prefix: [B, KVH, T, D]; k/v_new: [B, KVH, S, D]; new_mask: [B, Q, S] bool.
    Grouped-query heads are folded into the query axis so the prefix is read once per KV head.
    """
    b, h, nq, d = q.shape
    kvh = k_prefix.shape[1]
    g = h // kvh
    q = q.reshape(b, kvh, g * nq, d) * d**-0.5
    t = k_prefix.shape[2]
    # Scores in float32 (bf16 softmax loses too much); the two parts are normalized together
    # without concatenating them, which saves a copy of the large prefix scores.
    s_prefix = (q @ k_prefix.transpose(-1, -2)).float()
    beyond = torch.arange(t, device=q.device)[None, :] >= prefix_lengths[:, None]
    s_prefix.masked_fill_(beyond[:, None, None, :], float("-inf"))
    s_new = (q @ k_new.transpose(-1, -2)).float()
    mask = new_mask[:, None, None].expand(b, 1, g, nq, new_mask.shape[-1]).reshape(b, 1, g * nq, -1)
    s_new.masked_fill_(~mask, float("-inf"))
    # Every query sees itself among the new tokens, so the maximum is finite.
    m = s_new.amax(-1, keepdim=True)
    if t:
        m = torch.maximum(m, s_prefix.amax(-1, keepdim=True))
    p_prefix, p_new = (s_prefix - m).exp_(), (s_new - m).exp_()
    z = p_prefix.sum(-1, keepdim=True) + p_new.sum(-1, keepdim=True)
    out = (p_prefix.to(q.dtype) @ v_prefix).float() + (p_new.to(q.dtype) @ v_new).float()
    out = (out / z).to(q.dtype)
    return out.reshape(b, h, nq, d)


def backbone(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (`model.model`) of a *ForCausalLM / *ForSequenceClassification model."""
    return model.model


@torch.inference_mode()
def forward(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    prefix: PrefixKV,
    new_mask: torch.Tensor,
    past: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run `tokens` [B, Q] at `positions` [B, Q] over `prefix`; return the final-norm hidden
    states [B, Q, hidden] and the new tokens' keys and values per layer ([B, KVH, Q, D]).

    `past` holds keys/values [B, KVH, S, D] per layer of tokens beyond the prefix that earlier
    calls produced (rollout branches); then `new_mask` is [B, Q, S + Q] over [past ; new]."""
    m = backbone(model)
    h = m.embed_tokens(tokens)
    cos, sin = m.rotary_emb(h, positions)
    b, nq = tokens.shape
    new_keys, new_values = [], []
    for i, layer in enumerate(m.layers):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        shape = (b, nq, -1, attn.head_dim)
        q = attn.q_proj(x).view(shape)
        k = attn.k_proj(x).view(shape)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k_all, v_all = (k, v) if past is None else (
            torch.cat([past[0][i], k], dim=2), torch.cat([past[1][i], v], dim=2)
        )
        o = attend(q, prefix.keys[i], prefix.values[i], prefix.lengths, k_all, v_all, new_mask)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, nq, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        new_keys.append(k)
        new_values.append(v)
    return m.norm(h), new_keys, new_values


def causal_mask(new_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, Q, Q] mask for rows extended by runs of `new_lengths` tokens, padded to `width`.
    Padding queries see only themselves, so no softmax row is empty."""
    idx = torch.arange(width, device=new_lengths.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    valid_key = idx[None, None, :] < new_lengths[:, None, None]
    return (causal & valid_key) | torch.eye(width, dtype=torch.bool, device=idx.device)[None]


def branch_mask(lengths: torch.Tensor, span: int) -> torch.Tensor:
    """[B, k*span, k*span] mask for k independent branches per row, each a causal run of
    `lengths[b, j]` tokens laid out in its own span of columns (j*span + t). With span 1 the k
    branches are k sibling candidates. Padding sees only itself."""
    b, k = lengths.shape
    t = torch.arange(span, device=lengths.device)
    branch = torch.arange(k, device=lengths.device).repeat_interleave(span)
    step = t.repeat(k)
    same = branch[:, None] == branch[None, :]
    causal = step[None, :] <= step[:, None]
    valid_key = step[None, None, :] < lengths[:, branch][:, None, :]
    eye = torch.eye(k * span, dtype=torch.bool, device=lengths.device)
    return (same & causal)[None] & valid_key | eye[None]
