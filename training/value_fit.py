"""`alignd train-value`, stage 3: the value model V, fitted by TD(lambda) with gamma = 1 to the
samples' rewards, checkpointed after every epoch and resumed from."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from alignd.rewards.specs import GuideError, same_vocab
from alignd.training.hf_models import keep_layers, one_label
from alignd.training.stats import pearson, spearman
from alignd.training.value_settings import TrainValueSettings
from alignd.training.vllm_sampling import prompt_seed

log = logging.getLogger("alignd.train_value")

CHECKPOINT = "checkpoint"
STATE = "trainer.pt"


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
        keep_layers(cfg, 0, layers)
    one_label(cfg, base_tokenizer)
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


def train(args: TrainValueSettings, base_tokenizer, data: dict, train_idx: list[int], test_idx: list[int], out_dir: Path,
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
        log.info("epoch 0 (untrained): holdout %s", brief(history[-1]["holdout"]))
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
                 brief(row["holdout"]), row["seconds"])
        save_checkpoint(out_dir, model, optimizer, {"epoch": epoch, "history": history, "fingerprint": fingerprint})
    if start >= args.epochs:
        log.info("training: the checkpoint already has %d epochs; nothing to train", start)
    return model, history


def brief(m: dict) -> str:
    return (f"td loss {m['td_loss']:.4f}, V(final)~R pearson {m['pearson_final']:.3f} spearman "
            f"{m['spearman_final']:.3f}, V(prompt)~R pearson {m['pearson_prompt']:.3f}")
