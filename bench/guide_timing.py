"""Timings of the guide models' bare compute, shared by the benchmarks (torch only, no vLLM).

`decoders_speed.py` ships these functions into the vLLM engine worker through `collective_rpc`
(they time the worker's own loaded guide models there); `guide_step.py` calls them in process
where vLLM cannot run (the lent GPU machine).

- `time_score_candidates`: one forward of rows x k candidate tokens against each row's cached
  prefix (`GuideModel.score_candidates`): the scoring part of an ARGS step (reward model) or of a
  VAS step (value model);
- `time_lm_step`: one decode step of a guide LM, one new token per row against its cached prefix
  (`GuideModel.last_outputs`): DeRa's reference step, and the eager-PyTorch stand-in for a plain
  decode step where vLLM is absent;
- `time_transfer_q`: a Transfer Q* step's two parts, the baseline's batched greedy rollouts
  (`GuideModel.rollout`, rows x k branches, forked from the cached prefixes) and one tree-masked
  reward forward over the k branches of 1 + rollout tokens (`GuideModel.score_branches`);
- `time_score_candidates_fresh`: `time_score_candidates` in a process of its own, the score model
  loaded from its folder as the engine worker loads it (decoders_speed's cross-check of the
  worker's timings, with the worker's threads and cores);
- `time_regenerate`: the same Transfer Q* step as the reference code does it, from scratch with
  plain transformers: per row, `generate` the k rollouts from [s, v] (prompt prefill included;
  the k candidates of a row batched in one call, to be generous to it), then the reward model
  over the k whole texts.

Every function returns medians in seconds plus the thread's CPU share while timing (CPU time /
wall time of the timing thread; < 1 means another process took the core).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    wall = time.perf_counter() - wall0
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "reps": reps,
        "threads": torch.get_num_threads(),
        "cpu_share": (time.thread_time() - cpu0) / wall if wall > 0 else float("nan"),
    }


def _random_tokens(vocab: int, shape: tuple[int, ...], seed: int, low: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, shape, generator=g)


def time_score_candidates(guide, prompts: list[list[int]], k: int, reps: int, seed: int) -> dict:
    """Median seconds of `guide.score_candidates` for len(prompts) rows x k candidates against
    the rows' cached prefixes (synced once, untimed)."""
    cands = _random_tokens(guide.vocab_size, (len(prompts), k), seed, low=0)
    # Inference mode, as in the engine (the guide's cache tensors are inference tensors).
    with torch.inference_mode():
        slots = [guide.open() for _ in prompts]
        try:
            guide.sync(slots, prompts)
            out = _timed(lambda: guide.score_candidates(slots, prompts, cands), guide.device, reps, warmup=2)
        finally:
            for slot in reversed(slots):  # last first: closing moves no cache rows
                guide.close(slot)
    return out


def time_score_candidates_fresh(folder: str, dtype: str, max_len: int, prompt_sets: list[list[list[int]]], k: int,
                                reps: int, threads: int | None, affinity: list[int] | None) -> tuple[list[dict], str]:
    """`time_score_candidates` for each prompt set, in this (fresh) process: the one-label score model
    at `folder` loaded as the worker loads it, on `threads` torch threads pinned to `affinity`.
    Returns the timings and a line saying where they ran."""
    from transformers import AutoModelForSequenceClassification

    from alignd.rewards.guide_model import GuideModel

    if threads:
        torch.set_num_threads(threads)
    if affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, affinity)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device)
    guide = GuideModel(model, "score", max_len + 1)
    out = [time_score_candidates(guide, prompts, k, reps, 0) for prompts in prompt_sets]
    aff = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    return out, f"fresh process for bare forwards (after engine shutdown): torch threads {torch.get_num_threads()}, " \
                f"cpu affinity {aff}"


def time_lm_step(guide, prompts: list[list[int]], reps: int, seed: int) -> dict:
    """Median seconds of one decode step of a guide LM: each row's sequence grows by one token and
    `last_outputs` runs it against the cached prefix (rows tokens, logits over the vocabulary).
    The token is taken back after each step, so the context stays at len(prompt) + 1."""
    seqs = [list(p) for p in prompts]
    nxt = _random_tokens(guide.vocab_size, (len(seqs),), seed).tolist()
    with torch.inference_mode():
        slots = [guide.open() for _ in seqs]

        def step() -> None:
            for q, t in zip(seqs, nxt):
                q.append(t)
            guide.last_outputs(slots, seqs)
            for s, q in zip(slots, seqs):
                q.pop()
                s.length -= 1

        try:
            guide.sync(slots, seqs)
            out = _timed(step, guide.device, reps, warmup=2)
        finally:
            for slot in reversed(slots):
                guide.close(slot)
    return out


def time_transfer_q(baseline, reward, prompts: list[list[int]], k: int, rollout_tokens: int, reps: int,
                    seed: int) -> dict:
    """Medians of a Transfer Q* step's bare compute: the baseline's rollouts (rows x k branches,
    `rollout_tokens` greedy steps, no end-of-sequence stop: the full length every time) and one
    reward forward over the k branches of 1 + rollout_tokens tokens per row (tree mask)."""
    cands = _random_tokens(baseline.vocab_size, (len(prompts), k), seed)
    with torch.inference_mode():
        slots_b = [baseline.open() for _ in prompts]
        slots_r = [reward.open() for _ in prompts]
        try:
            baseline.sync(slots_b, prompts)
            reward.sync(slots_r, prompts)
            holder: dict = {}

            def roll() -> None:
                holder["out"] = baseline.rollout(slots_b, prompts, cands, rollout_tokens, None)

            rollout = _timed(roll, baseline.device, reps)
            tokens, lengths = holder["out"]
            branches = torch.cat([cands.to(tokens.device)[..., None], tokens], dim=-1)
            score = _timed(lambda: reward.score_branches(slots_r, prompts, branches, 1 + lengths),
                           reward.device, reps)
        finally:
            for slot in reversed(slots_r):
                reward.close(slot)
            for slot in reversed(slots_b):
                baseline.close(slot)
    return {
        "rollout": rollout,
        "reward": score,
        "median_s": rollout["median_s"] + score["median_s"],
        "cpu_share": min(rollout["cpu_share"], score["cpu_share"]),
        "threads": torch.get_num_threads(),
    }


def time_regenerate(lm, rm, prompts: list[list[int]], k: int, rollout_tokens: int, steps: int, seed: int,
                    max_rows: int | None = None, eos: int | None = None, pad: int | None = None) -> dict:
    """Seconds of one Transfer Q* step done from scratch as the reference code does it, with plain
    transformers models (`lm` a *ForCausalLM, `rm` a one-label *ForSequenceClassification): for
    each row, `lm.generate` the k greedy rollouts of `rollout_tokens` from [s, v] (the k candidates
    in one batched call; the prompt is prefilled again every time), then `rm` over the k whole
    texts [s, v, rollout] in one batch.

    Rows run one after the other, so a step costs the sum over its rows. `max_rows` times only the
    first max_rows rows of each step and scales their mean to all rows (noted in the result).
    One row at the smallest size is run first, untimed (kernels, allocator)."""
    from transformers import GenerationConfig

    device = next(lm.parameters()).device
    rows = len(prompts)
    timed_rows = rows if not max_rows else min(rows, max_rows)
    cands = _random_tokens(lm.config.vocab_size, (rows, k), seed).tolist()
    if pad is None:
        pad = eos if eos is not None else 0
    # eos None: every rollout runs its full length (transformers would otherwise fill in the
    # model's default eos id; min_new_tokens keeps it from being chosen)
    config = GenerationConfig(do_sample=False, max_new_tokens=rollout_tokens, pad_token_id=pad, eos_token_id=eos,
                              min_new_tokens=rollout_tokens if eos is None else None, use_cache=True)

    def one_row(seq: list[int], row: list[int]) -> int:
        ids = torch.tensor([seq + [c] for c in row], device=device)
        out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        rm(input_ids=out).logits[:, 0].float().cpu()  # pools at each text's last non-pad token
        return out.shape[1] - ids.shape[1]

    per_row, generated = [], []
    with torch.inference_mode():
        one_row(prompts[0][:8], cands[0])
        synchronize(device)
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for _ in range(steps):
            for seq, row in zip(prompts[:timed_rows], cands[:timed_rows]):
                start = time.perf_counter()
                generated.append(one_row(seq, row))
                synchronize(device)
                per_row.append(time.perf_counter() - start)
        wall = time.perf_counter() - wall0
    row_s = statistics.mean(per_row)
    return {
        "median_s": row_s * rows,  # one step of all rows (sum over rows: they run one after the other)
        "row_mean_s": row_s,
        "row_min_s": min(per_row),
        "row_max_s": max(per_row),
        "rows": rows,
        "rows_timed": timed_rows,
        "steps": steps,
        "mean_rollout_tokens": statistics.mean(generated),
        "threads": torch.get_num_threads(),
        "cpu_share": (time.thread_time() - cpu0) / wall if wall > 0 else float("nan"),
    }
