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


def _greedy_with(rule, prompt: list[int], max_new: int, eos: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new):
        token = rule(seq)
        seq.append(token)
        if token == eos:
            break
    return seq[len(prompt):]


def args_greedy(base, rewards: list[tuple[Scorer, float]], prompt: list[int], k: int, max_new: int, eos: int) -> list[int]:
    """ARGS-greedy: argmax over the top-k of z_v + sum_i w_i r_i(seq + [v])."""

    def rule(seq):
        z, cands = next_logits(base, seq).topk(k)
        scores = [z[j].item() + sum(w * r(seq + [cands[j].item()]) for r, w in rewards) for j in range(k)]
        return cands[max(range(k), key=scores.__getitem__)].item()

    return _greedy_with(rule, prompt, max_new, eos)


def greedy(base, prompt: list[int], max_new: int, eos: int) -> list[int]:
    return _greedy_with(lambda seq: int(next_logits(base, seq).argmax()), prompt, max_new, eos)


def vas_greedy(base, values: list[tuple[Scorer, float]], prompt, k, max_new, eos) -> list[int]:
    """VAS-greedy: z_v + sum_i beta_i (V_i(seq + [v]) - mean over the top-k) on the top-k."""

    def rule(seq):
        z = next_logits(base, seq)
        top = z.topk(k).indices.tolist()
        raw = [sum(b * v(seq + [c]) for v, b in values) for c in top]
        mean = sum(raw) / k
        for c, r in zip(top, raw):
            z[c] += r - mean
        return int(z.argmax())

    return _greedy_with(rule, prompt, max_new, eos)


def dera_greedy(served, reference, lam: float, prompt, max_new, eos) -> list[int]:
    """DeRa-greedy: argmax of z_ref + lambda (z_served - z_ref)."""

    def rule(seq):
        z, z_ref = next_logits(served, seq), next_logits(reference, seq)
        return int((z_ref + lam * (z - z_ref)).argmax())

    return _greedy_with(rule, prompt, max_new, eos)


@torch.no_grad()
def transfer_q_greedy(base, baseline, rewards: list[tuple[Scorer, float]], prompt, k, rollout, max_new, eos):
    """Transfer Q*-greedy the slow way: every candidate's rollout regenerated from scratch with the
    baseline (greedy, `rollout` tokens or until eos), the whole text scored by the rewards."""

    def rule(seq):
        z, cands = next_logits(base, seq).topk(k)
        scores = []
        for zv, c in zip(z.tolist(), cands.tolist()):
            branch = seq + [c]
            if c != eos:
                branch = branch + greedy(baseline, branch, rollout, eos)
            scores.append(zv + sum(w * r(branch) for r, w in rewards))
        return cands[max(range(k), key=scores.__getitem__)].item()

    return _greedy_with(rule, prompt, max_new, eos)


class Biased:
    """A causal LM whose logits get OpenAI's `logit_bias` added: what the engine hands a decoder."""

    def __init__(self, model, bias: dict[int, float]) -> None:
        self.model, self.bias = model, bias

    def __call__(self, ids: torch.Tensor):
        out = self.model(ids)
        for token, b in self.bias.items():
            out.logits[..., token] += b
        return out


def repetition_penalized_greedy(base, penalty: float, prompt: list[int], max_new: int, eos: int) -> list[int]:
    """Greedy under a repetition penalty (CTRL's): a token already in the prompt or the output has
    its logit divided by `penalty` when positive, multiplied when negative."""

    def rule(seq):
        z = next_logits(base, seq)
        seen = torch.tensor(sorted(set(seq)))
        z[seen] = torch.where(z[seen] > 0, z[seen] / penalty, z[seen] * penalty)
        return int(z.argmax())

    return _greedy_with(rule, prompt, max_new, eos)
