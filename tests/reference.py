"""Straightforward, independent implementations the tests compare the server against.

Everything here recomputes from the whole sequence with plain transformers forwards, the way
the papers' reference code does: no caches, no batching, no alignd code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Scorer = Callable[[list[int]], float]


def hf_reward(model, tokenizer=None, base_tokenizer=None) -> Scorer:
    """r(seq) from a sequence-classification model; re-tokenized through text when its
    tokenizer differs from the base model's."""

    def score(seq: list[int]) -> float:
        ids = seq
        if tokenizer is not None:
            ids = tokenizer(base_tokenizer.decode(seq, skip_special_tokens=True))["input_ids"]
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, 0].item()

    return score


def text_reward(fn, base_tokenizer) -> Scorer:
    return lambda seq: float(fn([base_tokenizer.decode(seq, skip_special_tokens=True)])[0])


@torch.no_grad()
def next_logits(base, seq: list[int]) -> torch.Tensor:
    return base(torch.tensor([seq])).logits[0, -1].float()


def args_greedy(base, rewards: list[tuple[Scorer, float]], prompt: list[int], k: int, max_new: int, eos: int) -> list[int]:
    """ARGS-greedy: argmax over the top-k of z_v + sum_i w_i r_i(seq + [v])."""
    seq = list(prompt)
    for _ in range(max_new):
        z, cands = next_logits(base, seq).topk(k)
        scores = [
            z[j].item() + sum(w * r(seq + [cands[j].item()]) for r, w in rewards) for j in range(k)
        ]
        token = cands[max(range(k), key=scores.__getitem__)].item()
        seq.append(token)
        if token == eos:
            break
    return seq[len(prompt):]


def greedy(base, prompt: list[int], max_new: int, eos: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new):
        token = int(next_logits(base, seq).argmax())
        seq.append(token)
        if token == eos:
            break
    return seq[len(prompt):]
