"""DeRa: Decoding-time Realignment (Liu et al., ICML 2024).

    z = z_ref + λ · (z_served − z_ref)

over the whole vocabulary; λ = 0 is the reference (SFT) model, 1 the served (aligned) model,
λ > 1 extrapolates. The reference keeps its own KV cache and advances one token per step. Tokens
the engine has already ruled out (-inf: grammar, allowed-token masks) stay ruled out. A request's
`logit_bias` b, which the engine adds to z_served only, is made to count once whatever λ:
z + (1 − λ) · b = z_ref + b + λ · (z_served − z_ref).
"""

from __future__ import annotations

import torch

from alignd.decoders.base import Row, guide_call, lm_states, logit_bias
from alignd.decoders.guides import Guides


def step(guides: Guides, rows: list[Row], seqs: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
    with guide_call("reference"):
        reference, states = lm_states(guides, "reference", rows)
        z_ref = reference.last_outputs(states, seqs)
    lam = torch.tensor([row.params.lambda_ for row in rows], device=logits.device)[:, None]
    mixed = z_ref.to(logits.device) + lam * (logits - z_ref.to(logits.device))
    bias = logit_bias(rows, logits)
    if bias is not None:
        mixed = mixed + (1 - lam) * bias
    return torch.where(torch.isfinite(logits), mixed, logits)
