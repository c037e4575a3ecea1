"""The guide models' forward pass, as plain functions over a Hugging Face Llama-family model.

A guide forward extends rows that already have a prefix in the KV pool by new tokens laid out
as *branches*: every branch of a row attends to the row's cached prefix and to its own tokens
only. One branch of a run of tokens extends a row (a causal mask); k branches of one token score
k sibling candidates against one shared prefix (the tree trick that makes ARGS cheap); k branches
of a run score k rollouts (Transfer Q*). Because a branch never sees another, attention over the
new tokens costs k · span² per row, not (k · span)², and it is computed in blocks of bounded size
whatever the batch, the number of branches or the length of a run.

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

# Attention scores (float32) one block may hold: 2**25 is 128 MiB, so with its exp and the
# probabilities a block stays under about half a GiB of temporaries.
BLOCK_SCORES = 1 << 25


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


@dataclass
class BranchKV:
    """Per-layer keys/values of tokens beyond the prefix, per branch: [rows, kv_heads, branches,
    capacity, head_dim], `length` of them filled. A forward given one writes its new tokens'
    keys/values after `length` and attends over everything up to them (rollouts grow one token
    a step without copying what came before)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0


def _attend_block(q, k_prefix, v_prefix, beyond, k_new, v_new, new_mask) -> torch.Tensor:
    """q [b, kvh, nb, g, w, d]; k/v_prefix [b, kvh, T, d]; beyond [b, T] (masked prefix
    positions); k/v_new [b, kvh, nb, S, d]; new_mask [b, nb, w, S]. Returns [b, kvh, nb, g, w, d].

    A branch's g query heads of one KV head sit next to each other, so its new keys are read as
    they lie in memory (no broadcast copy of them, which in a rollout would grow every step)."""
    b, kvh, nb, g, w, d = q.shape
    t, s = k_prefix.shape[2], k_new.shape[3]
    # Scores in float32 (bf16 softmax loses too much); the prefix and branch parts are normalized
    # together without concatenating them, which saves a copy of the large prefix scores.
    s_prefix = (q.reshape(b, kvh, nb * g * w, d) @ k_prefix.transpose(-1, -2)).float()
    s_prefix = s_prefix.masked_fill_(beyond[:, None, None, :], float("-inf")).view(b, kvh, nb, g * w, t)
    s_new = (q.reshape(b, kvh, nb, g * w, d) @ k_new.transpose(-1, -2)).float()
    s_new.view(b, kvh, nb, g, w, s).masked_fill_(~new_mask[:, None, :, None], float("-inf"))
    # Every query sees itself among its branch's tokens, so the maximum is finite.
    m = s_new.amax(-1, keepdim=True)
    if t:
        m = torch.maximum(m, s_prefix.amax(-1, keepdim=True))
    p_prefix, p_new = (s_prefix - m).exp_(), (s_new - m).exp_()
    z = p_prefix.sum(-1, keepdim=True) + p_new.sum(-1, keepdim=True)
    out = (p_prefix.to(q.dtype).view(b, kvh, nb * g * w, t) @ v_prefix).float().view(b, kvh, nb, g * w, d)
    out += (p_new.to(q.dtype) @ v_new).float()
    return (out / z).to(q.dtype).view(b, kvh, nb, g, w, d)


def attend(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    prefix_lengths: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    new_mask: torch.Tensor,
) -> torch.Tensor:
    """Attention of new queries over [cached prefix ; their branch's own tokens].

    q: [B, H, Q, D] with Q = branches x width (branch j owns queries j*width ... (j+1)*width-1);
    k/v_prefix: [B, KVH, T, D]; k/v_new: [B, KVH, branches, S, D]; new_mask: [B, branches, width, S].
    Grouped-query heads are folded into the query axis so the prefix is read once per KV head.
    Rows, branches and queries are cut into blocks of at most BLOCK_SCORES scores.
    """
    b, h, nq, d = q.shape
    kvh, t = k_prefix.shape[1], k_prefix.shape[2]
    g = h // kvh
    nb, w, s = new_mask.shape[1:]
    q = (q * d**-0.5).view(b, kvh, g, nb, w, d).transpose(2, 3)
    beyond = torch.arange(t, device=q.device)[None, :] >= prefix_lengths[:, None]
    per_query = kvh * g * (t + s)
    wb = max(1, min(w, BLOCK_SCORES // per_query))
    jb = max(1, min(nb, BLOCK_SCORES // (per_query * wb)))
    rb = max(1, min(b, BLOCK_SCORES // (per_query * wb * jb)))
    if (rb, jb, wb) == (b, nb, w):
        out = _attend_block(q, k_prefix, v_prefix, beyond, k_new, v_new, new_mask)
    else:
        out = torch.empty_like(q)
        for r in range(0, b, rb):
            rows = slice(r, r + rb)
            for j in range(0, nb, jb):
                branches = slice(j, j + jb)
                for i in range(0, w, wb):
                    queries = slice(i, i + wb)
                    out[rows, :, branches, :, queries] = _attend_block(
                        q[rows, :, branches, :, queries], k_prefix[rows], v_prefix[rows], beyond[rows],
                        k_new[rows, :, branches], v_new[rows, :, branches], new_mask[rows, branches, queries],
                    )
    return out.transpose(2, 3).reshape(b, h, nq, d)


@torch.inference_mode()
def forward(
    model: PreTrainedModel,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    prefix: PrefixKV,
    new_mask: torch.Tensor,
    past: BranchKV | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Run `tokens` [B, Q] at `positions` [B, Q] over `prefix`, the Q tokens being
    new_mask.shape[1] branches of equal width; return the final-norm hidden states [B, Q, hidden]
    and the new tokens' keys and values per layer ([B, KVH, Q, D]).

    With `past`, each branch also sees its tokens from earlier calls, and the new ones are
    written into it; `new_mask` [B, branches, width, past.length + width] covers [past ; new]."""
    m = model.model
    h = m.embed_tokens(tokens)
    cos, sin = m.rotary_emb(h, positions)
    b, nq = tokens.shape
    nb = new_mask.shape[1]
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
        kvh, d = k.shape[1], k.shape[3]
        k_branch, v_branch = k.reshape(b, kvh, nb, -1, d), v.reshape(b, kvh, nb, -1, d)
        if past is not None:
            end = past.length + k_branch.shape[3]
            past.keys[i][:, :, :, past.length : end] = k_branch
            past.values[i][:, :, :, past.length : end] = v_branch
            k_branch, v_branch = past.keys[i][:, :, :, :end], past.values[i][:, :, :, :end]
        o = attend(q, prefix.keys[i], prefix.values[i], prefix.lengths, k_branch, v_branch, new_mask)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(b, nq, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        new_keys.append(k)
        new_values.append(v)
    if past is not None:
        past.length += nq // nb
    return m.norm(h), new_keys, new_values


def branch_mask(lengths: torch.Tensor, span: int) -> torch.Tensor:
    """[B, k, span, span] mask for k branches per row, each a causal run of `lengths[b, j]`
    tokens padded to `span`. With span 1 the k branches are k sibling candidates. Padding sees
    only itself, so no softmax row is empty."""
    t = torch.arange(span, device=lengths.device)
    causal = t[:, None] >= t[None, :]
    valid_key = t[None, None, None, :] < lengths[:, :, None, None]
    return (causal & valid_key) | torch.eye(span, dtype=torch.bool, device=t.device)


def causal_mask(new_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """[B, 1, W, W] mask for rows extended by one run of `new_lengths` tokens, padded to `width`."""
    return branch_mask(new_lengths[:, None], width)
