"""VAS: Value Augmented Sampling (Han, Shenfeld et al., 2024).

    z'_v = z_v + Σ_i β_i · (V_i([s, v]) − mean_{u in top-k} V_i([s, u]))    for v in top-k(z)
    z'_v = z_v                                                              otherwise

then the request's ordinary temperature / top-p sampling. Several value models, each with its
own β, compose in one request (the paper's personalization at deployment).
"""

from __future__ import annotations

import torch

from alignd.decoders.base import Row, top_k, weighted
from alignd.decoders.guides import Guides


def step(guides: Guides, rows: list[Row], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    _, cands, own = top_k(rows, logits)
    value = weighted(guides, "value", rows, seqs, cands[..., None], torch.ones_like(cands))
    mean = (value * own).sum(-1, keepdim=True) / own.sum(-1, keepdim=True)
    return logits.scatter_add(1, cands, torch.where(own, value - mean, 0.0))
