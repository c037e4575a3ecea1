"""`alignd train-value`, stages 1 and 2: the prompts, the base model's samples, their rewards
(each cached in the output folder as JSONL, resumed from)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from alignd.rewards.specs import GuideError
from alignd.training import vllm_sampling
from alignd.training.hf_models import encode, pad_id
from alignd.training.value_settings import TrainValueSettings
from alignd.training.vllm_sampling import append_jsonl, prompt_seed

log = logging.getLogger("alignd.train_value")

SAMPLES = "samples.jsonl"
REWARDS = "rewards.jsonl"
SCORE_CHUNK = 64  # sequences per reward call: a progress step, and what a crash can lose


# -- small helpers ---------------------------------------------------------------------------------
def read_prompts(path: Path) -> list[str | list[dict]]:
    """Text prompts, or chat message lists (JSONL 'messages'). Blank lines are skipped."""
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise GuideError(f"--prompts {path}: cannot read it ({e})") from e
    if not lines:
        raise GuideError(f"{path}: no prompts")
    if not all(line.lstrip().startswith("{") for line in lines):
        return lines
    prompts: list[str | list[dict]] = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise GuideError(f"{path}:{n}: not a JSON object ({e})") from e
        if not isinstance(row, dict):
            raise GuideError(f"{path}:{n}: not a JSON object")
        if isinstance(row.get("prompt"), str):
            prompts.append(row["prompt"])
        elif isinstance(row.get("messages"), list):
            prompts.append(row["messages"])
        else:
            raise GuideError(f"{path}:{n}: a JSONL prompt needs a 'prompt' string or a 'messages' list")
    return prompts


def encode_prompt(tokenizer, prompt: str | list[dict], fmt: str) -> list[int]:
    """Token ids as the server's engine would see them: chat prompts go through the chat
    template (its text already holds any BOS, so no special tokens are added again), raw text
    is encoded like vLLM's completions endpoint does (with the tokenizer's special tokens)."""
    return encode(tokenizer, prompt, fmt == "chat" or (fmt == "auto" and bool(tokenizer.chat_template)))


def stop_ids(model_path: str, tokenizer) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the generation config's, as vLLM does."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        extra = GenerationConfig.from_pretrained(model_path).eos_token_id
    except OSError:  # no generation_config.json
        extra = None
    ids |= set(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    return sorted(ids)


def read_jsonl(path: Path) -> list[dict]:
    """Complete lines only: a run killed mid-write leaves a partial last line, dropped here."""
    if not path.exists():
        return []
    rows, keep = [], 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            rows.append(json.loads(raw))
            keep += len(raw)
    if keep != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(keep)
    return rows


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN (a correlation of a constant V is undefined): write null instead."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def fingerprint_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# -- stage 1: sampling -----------------------------------------------------------------------------
def sample_hf(model_path: str, prompts: list[list[int]], start: int, args: TrainValueSettings, device: torch.device,
              eos: list[int], pad_id: int, out: Path) -> None:
    """transformers generate, one prompt at a time with its n samples as one batch: no padding
    (so nothing that differs from unbatched sampling), one seed per prompt, appended per prompt."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).to(device).eval()
    # A fresh config: the plain base distribution, whatever the folder's generation_config says.
    model.generation_config = GenerationConfig()
    greedy = args.temperature == 0
    for i in tqdm(range(start, len(prompts)), desc="sampling", initial=start, total=len(prompts), unit="prompt"):
        ids = torch.tensor([prompts[i]], device=device)
        torch.manual_seed(prompt_seed(args.seed, i))
        with torch.inference_mode():
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                temperature=None if greedy else args.temperature, top_k=0, top_p=1.0,
                max_new_tokens=args.max_tokens, num_return_sequences=args.samples_per_prompt,
                eos_token_id=eos or None, pad_token_id=pad_id,
            )
        rows = []
        for j, seq in enumerate(gen[:, ids.shape[1]:].tolist()):
            # generate pads a finished row after its EOS; the completion ends with the EOS.
            end = next((k + 1 for k, t in enumerate(seq) if t in eos), len(seq))
            rows.append({"prompt": i, "sample": j, "prompt_ids": prompts[i], "completion_ids": seq[:end]})
        append_jsonl(out, rows)


def sample(args: TrainValueSettings, tokenizer, prompts: list[list[int]], out_dir: Path, device: torch.device) -> list[dict]:
    path = out_dir / SAMPLES
    rows = read_jsonl(path)
    # Only prompts with all their samples count: a vLLM chunk may have been half written.
    counts: dict[int, int] = {}
    for r in rows:
        counts[r["prompt"]] = counts.get(r["prompt"], 0) + 1
    start = 0
    while counts.get(start) == args.samples_per_prompt:
        start += 1
    rows = [r for r in rows if r["prompt"] < start]
    if start == len(prompts):
        log.info("sampling: %d samples of %d prompts cached in %s; sampling skipped", len(rows), start, path)
        return rows
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sampler = args.sampler if args.sampler != "auto" else ("vllm" if device.type == "cuda" else "hf")
    log.info("sampling: %s, prompts %d..%d, %d samples each, max %d tokens, temperature %g (%s)",
             args.model, start, len(prompts) - 1, args.samples_per_prompt, args.max_tokens, args.temperature,
             "resumed" if start else "started")
    t0 = time.perf_counter()
    if sampler == "vllm":
        job = vllm_sampling.Job(prompts, [prompt_seed(args.seed, i) for i in range(len(prompts))],
                                args.samples_per_prompt, args.temperature, args.max_tokens, start)
        vllm_sampling.sample(args.model, [job], path, args.dtype)
    else:
        sample_hf(args.model, prompts, start, args, device, stop_ids(args.model, tokenizer), pad_id(tokenizer) or 0,
                  path)
    rows = read_jsonl(path)
    if len(rows) != len(prompts) * args.samples_per_prompt:
        raise GuideError(f"sampling ended with {len(rows)} samples of {len(prompts) * args.samples_per_prompt}")
    log.info("sampling: done in %.1f s, %d samples", time.perf_counter() - t0, len(rows))
    return rows


# -- stage 2: scoring ------------------------------------------------------------------------------
def score(args: TrainValueSettings, rewards: dict[str, str], samples: list[dict], out_dir: Path, device: torch.device,
          max_len: int) -> list[dict[str, float]]:
    """Each reward of each whole prompt+completion, by the server's own GuideRuntime.score."""
    from tqdm import tqdm

    from alignd.rewards.runtime import GuideRuntime
    from alignd.rewards.specs import GuideConfig

    path = out_dir / REWARDS
    seqs = [s["prompt_ids"] + s["completion_ids"] for s in samples]
    done = read_jsonl(path)
    if any(r["seq"] != fingerprint_of(seqs[r["i"]]) for r in done if r["i"] < len(seqs)) or len(done) > len(seqs):
        log.info("scoring: %s does not match the samples; they are scored again", path)
        path.unlink()
        done = []
    if len(done) == len(samples):
        log.info("scoring: %d scored samples cached in %s; scoring skipped", len(samples), path)
        return [r["rewards"] for r in done]
    runtime = GuideRuntime(GuideConfig(model=args.model, rewards=rewards), device, getattr(torch, args.dtype), max_len)
    t0 = time.perf_counter()
    with tqdm(total=len(samples), initial=len(done), desc="scoring", unit="sample") as bar:
        for lo in range(len(done), len(samples), SCORE_CHUNK):
            batch = seqs[lo : lo + SCORE_CHUNK]
            scores, failed = runtime.score(batch, list(rewards))
            broken = next((f for f in failed if f), None)
            if broken:
                raise GuideError(f"scoring failed: {broken}")
            append_jsonl(path, [{"i": lo + k, "seq": fingerprint_of(q), "rewards": r}
                                for k, (q, r) in enumerate(zip(batch, scores))])
            bar.update(len(batch))
    log.info("scoring: %d samples with %s in %.1f s", len(samples) - len(done), ", ".join(rewards),
             time.perf_counter() - t0)
    return [r["rewards"] for r in read_jsonl(path)]
