"""`alignd train-value`: make a VAS value model from a base model, rewards and prompts.

    alignd train-value --model BASE --reward NAME=SPEC [--reward NAME=SPEC ...] \\
        --prompts prompts.txt --out DIR [--backbone SMALLER_MODEL] [--backbone-layers N]

Three stages, each cached in DIR so that a rerun continues where the last one stopped:

1. sample   the frozen base model, `--samples-per-prompt` completions per prompt, plain
            temperature sampling (no top-k / top-p): the policy whose expected reward V estimates.
            `--sampler hf` (transformers generate; the default without a GPU: no engine start-up,
            nothing to spawn) or `vllm` (the offline engine in a child process; the default on a
            GPU). One seed per prompt. -> samples.jsonl (appended prompt by prompt / by chunks)
2. score    each prompt+completion with the rewards, exactly as the server scores a whole
            sequence (the same GuideRuntime); the training reward is their weighted sum.
            -> rewards.jsonl
3. train    a scalar-head model V by TD(lambda), gamma = 1, lambda = 0.95 (as in the VAS paper):
            one forward gives V at every state s_0 (prompt) .. s_T (whole sequence); targets by
            G_T = R, G_t = (1 - lambda) V(s_{t+1}) + lambda G_{t+1} (no gradient through G);
            MSE over the states; AdamW. -> checkpoint/ after every epoch, resumed from.

DIR is then a `*ForSequenceClassification` folder (num_labels = 1, the base model's tokenizer)
that `alignd serve --value NAME=DIR` loads on the KV-cached path, plus metrics.json,
train_log.jsonl, train.log and a README.md model card. V(prefix) is the head at the prefix's
last non-pad token: what transformers' sequence classifiers and alignd's guide runtime compute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from alignd.rewards.specs import GuideError, parse_named, same_vocab
from alignd.training import vllm_sampling
from alignd.training.stats import pearson, spearman
from alignd.training.vllm_sampling import append_jsonl, prompt_seed

log = logging.getLogger("alignd.train_value")

GAMMA = 1.0  # undiscounted: the reward arrives once, at the end; kept as a name for the docs
SAMPLES = "samples.jsonl"
REWARDS = "rewards.jsonl"
RUN = "run.json"
CHECKPOINT = "checkpoint"
STATE = "trainer.pt"
SCORE_CHUNK = 64  # sequences per reward call: a progress step, and what a crash can lose


# -- command line ----------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alignd train-value", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the frozen base model (folder or hub id) to sample")
    p.add_argument("--reward", action="append", default=[], required=True, metavar="NAME=SPEC",
                   help="a reward, as in `alignd serve`: *ForSequenceClassification folder or py:module:function")
    p.add_argument("--reward-weight", action="append", default=[], metavar="NAME=W",
                   help="weight of a reward in the training reward (default 1 each)")
    p.add_argument("--prompts", required=True, type=Path,
                   help="one prompt per line, or JSONL with a 'prompt' (text) or 'messages' (chat) field")
    p.add_argument("--out", required=True, type=Path, help="output folder (also the cache a rerun resumes from)")
    p.add_argument("--backbone", metavar="PATH_OR_ID",
                   help="initial weights of V: a smaller model with the base tokenizer (default: the base)")
    p.add_argument("--backbone-layers", type=int, metavar="N", help="keep only the backbone's first N decoder layers")
    p.add_argument("--samples-per-prompt", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128, help="completion length limit when sampling")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--prompt-format", choices=["auto", "chat", "raw"], default="auto",
                   help="chat: wrap text prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--sampler", choices=["auto", "hf", "vllm"], default="auto",
                   help="hf: transformers generate; vllm: vLLM's offline LLM (auto: vllm on a CUDA GPU, else hf)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--td-lambda", type=float, default=0.95)
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of prompts held out for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the base and reward models while sampling and scoring (V trains in float32)")
    return p


def command_line(args: argparse.Namespace) -> str:
    """The flags of this run as a shell line, for the log and the model card."""
    parts = ["alignd", "train-value"]
    for key, value in vars(args).items():
        if key in ("command", "func") or value is None or value == []:
            continue
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            parts += [flag, str(v)]
    return shlex.join(parts)


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
    chat = isinstance(prompt, list) or fmt == "chat" or (fmt == "auto" and tokenizer.chat_template)
    if not chat:
        return tokenizer(prompt)["input_ids"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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
def sample_hf(model_path: str, prompts: list[list[int]], start: int, args, device: torch.device,
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


def sample(args, tokenizer, prompts: list[list[int]], out_dir: Path, device: torch.device) -> list[dict]:
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
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        sample_hf(args.model, prompts, start, args, device, stop_ids(args.model, tokenizer), pad or 0, path)
    rows = read_jsonl(path)
    if len(rows) != len(prompts) * args.samples_per_prompt:
        raise GuideError(f"sampling ended with {len(rows)} samples of {len(prompts) * args.samples_per_prompt}")
    log.info("sampling: done in %.1f s, %d samples", time.perf_counter() - t0, len(rows))
    return rows


# -- stage 2: scoring ------------------------------------------------------------------------------
def score(args, rewards: dict[str, str], samples: list[dict], out_dir: Path, device: torch.device,
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


# -- stage 3: the value model ----------------------------------------------------------------------
def load_backbone(spec: str, layers: int | None, base_tokenizer, seed: int):
    """A fresh scalar-head model on the backbone's weights (its first `layers` decoder layers)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # transformers raises OSError, ValueError... for a folder without one
        raise GuideError(f"--backbone {spec}: cannot load its tokenizer to check its vocabulary ({e})") from e
    if not same_vocab(tok, base_tokenizer):
        raise GuideError(f"--backbone {spec}: its vocabulary differs from the base model's; the value model "
                         "must read the base model's tokens (pick a backbone of the same family)")
    cfg = AutoConfig.from_pretrained(spec)
    total = cfg.num_hidden_layers
    if layers is not None:
        if not 1 <= layers <= total:
            raise GuideError(f"--backbone-layers {layers}: the backbone has {total} layers")
        cfg.num_hidden_layers = layers
        if getattr(cfg, "layer_types", None):  # per-layer attention kinds (Qwen, Gemma...)
            cfg.layer_types = cfg.layer_types[:layers]
    cfg.num_labels = 1
    cfg.problem_type = "regression"
    # transformers pools at the last non-pad token, and so does alignd's runtime: the same pad
    # id everywhere keeps training, `from_pretrained` users and the server in agreement.
    pad = base_tokenizer.pad_token_id if base_tokenizer.pad_token_id is not None else base_tokenizer.eos_token_id
    cfg.pad_token_id = pad
    torch.manual_seed(seed)
    # ignore_mismatched_sizes: a classifier backbone may have another number of labels.
    model = AutoModelForSequenceClassification.from_pretrained(
        spec, config=cfg, dtype=torch.float32, ignore_mismatched_sizes=True
    )
    # The head starts at V = 0, the mean of the normalized reward: TD then bootstraps from a
    # neutral guess instead of noise (or a reward model's head, on another scale).
    torch.nn.init.zeros_(model.score.weight)
    log.info("value model: %s (%s), %d of %d layers, %.1fM parameters", spec, type(model).__name__,
             cfg.num_hidden_layers, total, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def state_values(model, seqs: list[list[int]], prompt_lens: list[int], pad_id: int | None,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """V(s_0) .. V(s_T) of each sequence: [n, S] and the number of states [n].

    s_j is the prompt followed by the first j completion tokens; V(s_j) is the head at its last
    token, or at the last non-pad token before it (as transformers and alignd pool)."""
    width = max(len(s) for s in seqs)
    fill = pad_id if pad_id is not None else 0
    ids = torch.tensor([s + [fill] * (width - len(s)) for s in seqs], device=device)
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    steps = torch.arange(width, device=device)
    attention = (steps[None] < lengths[:, None]).long()
    hidden = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=attention).last_hidden_state
    v = model.score(hidden)[..., 0].float()
    real = ids != pad_id if pad_id is not None else torch.ones_like(ids, dtype=torch.bool)
    pooled = torch.cummax(torch.where(real, steps[None], 0), dim=1).values
    v = v.gather(1, pooled)
    prompt = torch.tensor(prompt_lens, device=device)
    states = lengths - prompt + 1
    pos = (prompt[:, None] - 1 + torch.arange(int(states.max()), device=device)[None]).clamp(max=width - 1)
    return v.gather(1, pos), states


def td_lambda_targets(values: torch.Tensor, rewards: torch.Tensor, states: torch.Tensor,
                      lam: float) -> torch.Tensor:
    """lambda-returns with gamma = 1 and one terminal reward, for every state ([n, S]):
    G_last = R,  G_t = (1 - lam) V(s_{t+1}) + lam G_{t+1}. Columns past a row's last state hold R."""
    values = values.detach()
    last = states - 1
    g = rewards.clone()
    out = torch.empty_like(values)
    for t in range(values.shape[1] - 1, -1, -1):
        if t + 1 < values.shape[1]:
            boot = (1 - lam) * values[:, t + 1] + lam * g
            g = torch.where(t < last, boot, rewards)
        out[:, t] = g
    return out


def batches(indices: list[int], size: int):
    for lo in range(0, len(indices), size):
        yield indices[lo : lo + size]


@torch.no_grad()
def evaluate(model, data: dict, indices: list[int], batch_size: int, lam: float, device: torch.device) -> dict:
    """V at the prompt end and at the whole sequence against R (in reward units), and the TD loss."""
    model.eval()
    first, final, loss, count = [], [], 0.0, 0
    for b in batches(indices, batch_size):
        v, states = state_values(model, [data["seqs"][i] for i in b], [data["prompt_lens"][i] for i in b],
                                 data["pad_id"], device)
        r = data["z"][b].to(device)
        mask = torch.arange(v.shape[1], device=device)[None] < states[:, None]
        loss += (((v - td_lambda_targets(v, r, states, lam)) ** 2) * mask).sum().item()
        count += int(mask.sum())
        first.append(v[:, 0].cpu())
        final.append(v.gather(1, (states - 1)[:, None])[:, 0].cpu())
    mu, sigma = data["mu"], data["sigma"]
    r = data["reward"][indices]
    v0, vT = torch.cat(first) * sigma + mu, torch.cat(final) * sigma + mu
    return {
        "n": len(indices),
        "td_loss": loss / max(count, 1),
        "pearson_final": pearson(vT, r), "spearman_final": spearman(vT, r),
        "pearson_prompt": pearson(v0, r), "spearman_prompt": spearman(v0, r),
        "rmse_final": float(((vT - r) ** 2).mean().sqrt()),
    }


def split(prompt_ids: list[int], holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out samples are those of held-out prompts: V must generalize to prompts it never saw
    (a split by sample would let it remember a prompt's average reward)."""
    groups = sorted(set(prompt_ids))
    g = torch.Generator().manual_seed(seed)
    if len(groups) >= 2:
        keys = [groups[i] for i in torch.randperm(len(groups), generator=g).tolist()]
        held = set(keys[: min(len(groups) - 1, max(1, round(holdout * len(groups))))])
        test = [i for i, p in enumerate(prompt_ids) if p in held]
    else:  # one prompt: hold out samples
        order = torch.randperm(len(prompt_ids), generator=g).tolist()
        test = sorted(order[: min(len(order) - 1, max(1, round(holdout * len(order))))])
    test_set = set(test)
    return [i for i in range(len(prompt_ids)) if i not in test_set], test


def save_checkpoint(out_dir: Path, model, optimizer, state: dict) -> None:
    """checkpoint/ is replaced whole: written beside it, then renamed, so a crash leaves the old one."""
    tmp, final, old = out_dir / (CHECKPOINT + ".tmp"), out_dir / CHECKPOINT, out_dir / (CHECKPOINT + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / STATE)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, fingerprint: dict) -> tuple[Path, dict] | None:
    for name in (CHECKPOINT, CHECKPOINT + ".old"):  # .old: a crash between the two renames
        path = out_dir / name
        if (path / STATE).exists():
            state = torch.load(path / STATE, map_location="cpu", weights_only=True)
            if state["fingerprint"] == fingerprint:
                return path, state
            log.info("training: %s is from other settings; training starts over", path)
            return None
    return None


def train(args, base_tokenizer, data: dict, train_idx: list[int], test_idx: list[int], out_dir: Path,
          device: torch.device, fingerprint: dict):
    """Epochs of TD(lambda) on the training samples, resumed from checkpoint/; returns the model
    (predicting the normalized reward) and the per-epoch log."""
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification

    resumed = load_checkpoint(out_dir, fingerprint)
    if resumed:
        path, state = resumed
        model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        history, start = state["history"], state["epoch"]
        log.info("training: resumed from %s after epoch %d", path, start)
    else:
        model = load_backbone(args.backbone or args.model, args.backbone_layers, base_tokenizer, args.seed)
        state, history, start = None, [], 0
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    if not history:
        untrained = evaluate(model, data, test_idx, args.batch_size, args.td_lambda, device)
        history.append({"epoch": 0, "holdout": untrained})
        log.info("epoch 0 (untrained): holdout %s", _brief(history[-1]["holdout"]))
    for epoch in range(start + 1, args.epochs + 1):
        model.train()
        # The order of an epoch depends on (seed, epoch) only: a resumed run sees what an
        # uninterrupted one would have.
        g = torch.Generator().manual_seed(prompt_seed(args.seed, epoch))
        order = [train_idx[i] for i in torch.randperm(len(train_idx), generator=g).tolist()]
        total, count, t0 = 0.0, 0, time.perf_counter()
        bar = tqdm(list(batches(order, args.batch_size)), desc=f"epoch {epoch}/{args.epochs}", unit="batch")
        for b in bar:
            v, states = state_values(model, [data["seqs"][i] for i in b], [data["prompt_lens"][i] for i in b],
                                     data["pad_id"], device)
            target = td_lambda_targets(v, data["z"][b].to(device), states, args.td_lambda)
            mask = torch.arange(v.shape[1], device=device)[None] < states[:, None]
            loss = (((v - target) ** 2) * mask).sum() / mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total, count = total + loss.item() * int(mask.sum()), count + int(mask.sum())
            bar.set_postfix(loss=f"{total / count:.4f}")
        row = {"epoch": epoch, "train_td_loss": total / max(count, 1), "seconds": time.perf_counter() - t0,
               "holdout": evaluate(model, data, test_idx, args.batch_size, args.td_lambda, device)}
        history.append(row)
        log.info("epoch %d: train td loss %.4f, holdout %s (%.1f s)", epoch, row["train_td_loss"],
                 _brief(row["holdout"]), row["seconds"])
        save_checkpoint(out_dir, model, optimizer, {"epoch": epoch, "history": history, "fingerprint": fingerprint})
    if start >= args.epochs:
        log.info("training: the checkpoint already has %d epochs; nothing to train", start)
    return model, history


def _brief(m: dict) -> str:
    return (f"td loss {m['td_loss']:.4f}, V(final)~R pearson {m['pearson_final']:.3f} spearman "
            f"{m['spearman_final']:.3f}, V(prompt)~R pearson {m['pearson_prompt']:.3f}")


# -- outputs -----------------------------------------------------------------------------------------
MODEL_CARD = """\
---
library_name: transformers
base_model: {base}
tags: [alignd, value-model, vas]
---
# Value model for VAS (made by `alignd train-value`)

A `{arch}` with one output, V(prefix): the expected training reward of a completion of the
frozen base model `{base}` that starts with that prefix (prompt + tokens so far), read at the
prefix's last non-pad token. It uses the base model's tokenizer, so alignd runs it on the
KV-cached path:

    alignd serve --model {base} --value {name}={out}

then a request with `"alignment": {{"decoder": "vas", "values": {{"{name}": 1.0}}}}`.

## Training reward
R = {formula}, of the whole prompt + completion, with:
{reward_lines}
V predicts R - {mu:.6g} (the training mean; the head has no bias, and VAS only uses
differences between candidates). Its scale is R's: beta means the same as in the paper.

## Data
- {n_prompts} prompts from `{prompts}` ({fmt} format), {per} samples each, at most {max_tokens}
  tokens, temperature {temperature}, plain sampling (no top-k / top-p), seed {seed}.
- {n_train} training samples, {n_test} held out ({holdout_prompts} held-out prompts).

## Training
TD(lambda) with gamma = 1, lambda = {lam}: targets G_T = R at the whole sequence and
G_t = (1 - lambda) V(s_t+1) + lambda G_t+1 (no gradient through G), mean squared error over all
states from the prompt end to the whole sequence, on rewards normalized by the training mean and
standard deviation ({sigma:.6g}); AdamW, lr {lr}, weight decay {wd}, batch {batch}, {epochs} epochs.
Initial weights: `{backbone}`{layers_note}; the head started at zero.

## Held-out evaluation (samples of prompts never trained on)
| | Pearson | Spearman |
|---|---|---|
| V(whole sequence) vs R | {pf:.3f} | {sf:.3f} |
| V(prompt end) vs R | {pp:.3f} | {sp:.3f} |

RMSE of V(whole sequence) + mean against R: {rmse:.4g} (R's standard deviation: {sigma:.4g}).
Per-epoch numbers: `train_log.jsonl`; the run's log: `train.log`.

## Reproduce
    {command}

Made with alignd {version}. Caches (`samples.jsonl`, `rewards.jsonl`, `checkpoint/`) let a rerun
resume; they can be deleted once done.
"""


def write_outputs(args, model, base_tokenizer, data: dict, history: list[dict], split_info: dict,
                  rewards: dict[str, str], weights: dict[str, float], out_dir: Path) -> dict:
    """The value model folder (head rescaled to reward units), metrics.json, train_log.jsonl, README.md."""
    import alignd
    from alignd.rewards.specs import Route, classify

    model = model.cpu()
    with torch.no_grad():
        model.score.weight.mul_(data["sigma"])  # normalized units -> reward units
    model.config.alignd_value = {
        "base_model": args.model, "rewards": rewards, "weights": weights, "reward_mean": data["mu"],
        "reward_std": data["sigma"], "td_lambda": args.td_lambda, "gamma": GAMMA,
    }
    model.save_pretrained(out_dir)
    base_tokenizer.save_pretrained(out_dir)
    route = classify(str(out_dir), base_tokenizer, "value")
    if route is not Route.cached:
        log.warning("the value model will take alignd's slower %s path (%s)", route.value, model.config.model_type)
    final = history[-1]["holdout"]
    metrics = {"holdout": final, "route": route.value, "reward_mean": data["mu"], "reward_std": data["sigma"],
               **split_info, "epochs": history[-1]["epoch"], "command": command_line(args)}
    (out_dir / "metrics.json").write_text(json.dumps(finite_or_none(metrics), indent=2) + "\n")
    (out_dir / "train_log.jsonl").write_text("".join(json.dumps(finite_or_none(h)) + "\n" for h in history))
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", args.out.resolve().name).strip("-._") or "value"
    (out_dir / "README.md").write_text(MODEL_CARD.format(
        base=args.model, arch=type(model).__name__, name=name, out=args.out,
        formula=" + ".join(f"{w:g}·{n}" for n, w in weights.items()),
        reward_lines="\n".join(f"- {n} (weight {weights[n]:g}): `{s}`" for n, s in rewards.items()),
        mu=data["mu"], sigma=data["sigma"], n_prompts=split_info["prompts"], prompts=args.prompts,
        fmt=args.prompt_format, per=args.samples_per_prompt, max_tokens=args.max_tokens,
        temperature=args.temperature, seed=args.seed, n_train=split_info["train_samples"],
        n_test=split_info["holdout_samples"], holdout_prompts=split_info["holdout_prompts"],
        lam=args.td_lambda, lr=args.lr, wd=args.weight_decay, batch=args.batch_size, epochs=history[-1]["epoch"],
        backbone=args.backbone or args.model,
        layers_note=f", first {args.backbone_layers} layers" if args.backbone_layers else "",
        pf=final["pearson_final"], sf=final["spearman_final"], pp=final["pearson_prompt"],
        sp=final["spearman_prompt"], rmse=final["rmse_final"], command=command_line(args),
        version=alignd.__version__,
    ))
    return metrics


# -- the command -------------------------------------------------------------------------------------
def parse_weights(items: list[str], rewards: dict[str, str]) -> dict[str, float]:
    weights = {name: 1.0 for name in rewards}
    for item in items:
        name, value = parse_named(item, "--reward-weight")
        if name not in rewards:
            raise GuideError(f"--reward-weight {item!r}: no --reward named {name!r}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise GuideError(f"--reward-weight {item!r}: the weight must be a number") from None
        if not math.isfinite(weights[name]):
            raise GuideError(f"--reward-weight {item!r}: the weight must be finite")
    return weights


def check_run(out_dir: Path, settings: dict) -> None:
    """Caches from other sampling settings or rewards are never mixed in: samples are refused
    (the user chooses another --out), rewards are rescored (cheap next to sampling)."""
    path = out_dir / RUN
    if path.exists():
        old = json.loads(path.read_text())
        if old["sampling"] != settings["sampling"] and (out_dir / SAMPLES).exists():
            changed = sorted(k for k in settings["sampling"] if old["sampling"].get(k) != settings["sampling"][k])
            raise GuideError(f"{out_dir} holds samples made with other settings ({', '.join(changed)}); "
                             f"use another --out, or delete {out_dir / SAMPLES} to sample again")
        if old != settings and (out_dir / REWARDS).exists():
            log.info("scoring: the rewards or samples changed; the samples are scored again")
            (out_dir / REWARDS).unlink()
    path.write_text(json.dumps(settings, indent=2) + "\n")


def main(argv: list[str]) -> int:
    return run(parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """`alignd train-value`: sample, score, train, save. Returns the process exit status."""
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        return _run(args, out_dir)
    except GuideError as e:
        log.error("alignd train-value: %s", e)
        return 2
    finally:
        log.removeHandler(handler)
        handler.close()


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    log.info("%s", command_line(args))
    for flag in ("samples_per_prompt", "max_tokens", "epochs", "batch_size"):
        if getattr(args, flag) < 1:
            raise GuideError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 < args.holdout < 1 or not 0 <= args.td_lambda <= 1 or args.temperature < 0:
        raise GuideError("--holdout must be in (0, 1), --td-lambda in [0, 1], --temperature >= 0")
    rewards = dict(parse_named(item, "--reward") for item in args.reward)
    weights = parse_weights(args.reward_weight, rewards)
    device = pick_device(args.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except Exception as e:  # a bad folder or id: one line, not a traceback
        raise GuideError(f"--model {args.model}: cannot load its tokenizer ({type(e).__name__}: {e})") from e
    prompts = [encode_prompt(tokenizer, p, args.prompt_format) for p in read_prompts(args.prompts)]
    sampling = {"model": args.model, "prompts": fingerprint_of(prompts),
                "prompt_format": args.prompt_format, "samples_per_prompt": args.samples_per_prompt,
                "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    check_run(out_dir, {"sampling": sampling, "rewards": rewards})

    samples = sample(args, tokenizer, prompts, out_dir, device)
    max_len = max(len(s["prompt_ids"]) + len(s["completion_ids"]) for s in samples)
    scores = score(args, rewards, samples, out_dir, device, max_len)
    reward = torch.tensor([sum(weights[n] * r[n] for n in rewards) for r in scores], dtype=torch.float64)

    train_idx, test_idx = split([s["prompt"] for s in samples], args.holdout, args.seed)
    mu, sigma = reward[train_idx].mean().item(), reward[train_idx].std().item()
    if not sigma > 0:
        raise GuideError("the training reward is the same for every sample: nothing to learn")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = {"seqs": [s["prompt_ids"] + s["completion_ids"] for s in samples],
            "prompt_lens": [len(s["prompt_ids"]) for s in samples], "pad_id": pad,
            "reward": reward.float(), "z": ((reward - mu) / sigma).float(), "mu": mu, "sigma": sigma}
    log.info("data: %d samples (%d train, %d held out), R mean %.4g std %.4g", len(samples), len(train_idx),
             len(test_idx), mu, sigma)
    fingerprint = {"sampling": sampling, "rewards": rewards, "weights": weights, "backbone": args.backbone,
                   "backbone_layers": args.backbone_layers, "lr": args.lr, "weight_decay": args.weight_decay,
                   "batch_size": args.batch_size, "td_lambda": args.td_lambda, "holdout": args.holdout,
                   "seed": args.seed}
    model, history = train(args, tokenizer, data, train_idx, test_idx, out_dir, device, fingerprint)
    split_info = {"prompts": len(prompts), "train_samples": len(train_idx), "holdout_samples": len(test_idx),
                  "holdout_prompts": len({samples[i]["prompt"] for i in test_idx}),
                  "holdout_prompt_ids": sorted({samples[i]["prompt"] for i in test_idx})}
    metrics = write_outputs(args, model, tokenizer, data, history, split_info, rewards, weights, out_dir)
    log.info("done in %.1f s: %s (route %s); holdout %s", time.perf_counter() - t0, out_dir, metrics["route"],
             _brief(metrics["holdout"]))
    return 0
