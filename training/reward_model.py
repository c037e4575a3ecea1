"""How a reward model is made on the base model's own layers: the states of every prefix of a
text from one forward of the frozen lower layers, a linear probe that starts the head, the upper
layers, norm and head fine-tuned on soft labels, then one `*ForSequenceClassification` folder.
The demo reward models (fit_reward.py) are this recipe applied to two labellers."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from alignd.training.demo_data import COMPUTE_DTYPE
from alignd.training.hf_models import keep_layers, one_label

EPS = 1e-4  # labels are clipped to [EPS, 1 - EPS] before the loss


# -- which prefixes ----------------------------------------------------------------------------------
def cut_positions(ids: list[int], start: int, count: int, rng: random.Random, pad: int | None) -> list[int]:
    """Up to `count` random positions t in [start, len) plus the last one (a prefix is ids[:t+1]),
    only at non-pad tokens (a prefix ending in padding is scored as the prefix before it)."""
    ok = [t for t in range(max(start, 0), len(ids)) if ids[t] != pad]
    if not ok:
        return []
    picks = set(rng.sample(ok[:-1], min(count, len(ok) - 1))) | {ok[-1]}
    return sorted(picks)


# -- features ----------------------------------------------------------------------------------------
def load_backbone(base: str | Path, layers: int, dtype: torch.dtype):
    """The base model's first `layers` decoder layers and final norm (a LlamaModel)."""
    from transformers import AutoConfig, AutoModel

    cfg = AutoConfig.from_pretrained(base)
    keep_layers(cfg, 0, layers)
    return AutoModel.from_pretrained(base, config=cfg, dtype=dtype).eval()


@torch.inference_mode()
def hidden_features(backbone, seqs: list[list[int]], positions: list[list[int]], layers: tuple[int, ...],
                    pad: int, tokens_per_batch: int = 4096, desc: str = "features") -> dict[int, torch.Tensor]:
    """{L: [sum(len(p) for p in positions), hidden]}: final_norm(output of decoder layer L) at each
    listed position of each sequence (what a score head on the first L layers reads), float32,
    rows in the order of `seqs` then `positions`."""
    from tqdm import tqdm

    captured: dict[int, torch.Tensor] = {}
    hooks = []
    for layer in layers:
        def hook(module, args, output, layer=layer):
            captured[layer] = output[0] if isinstance(output, tuple) else output
        hooks.append(backbone.layers[layer - 1].register_forward_hook(hook))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks, lo = [], 0
    while lo < len(order):
        width = len(seqs[order[lo]])
        hi = lo + 1
        while hi < len(order) and len(seqs[order[hi]]) * (hi - lo + 1) <= tokens_per_batch:
            hi += 1
        chunks.append(order[lo:hi])
        lo = hi
    rows: dict[int, list[torch.Tensor]] = {layer: [None] * len(seqs) for layer in layers}
    try:
        for idx in tqdm(chunks, desc=desc, unit="batch"):
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx])
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx])
            backbone(input_ids=ids, attention_mask=mask)
            for layer in layers:
                h = captured[layer]
                for row, i in enumerate(idx):
                    rows[layer][i] = backbone.norm(h[row, positions[i]]).float()
    finally:
        for h in hooks:
            h.remove()
    hidden = backbone.config.hidden_size
    return {layer: torch.cat([r for r in rows[layer] if r is not None] or [torch.empty(0, hidden)])
            for layer in layers}


# -- the head -------------------------------------------------------------------------------------------
def fit_logistic(x: torch.Tensor, p: torch.Tensor, l2: float, iters: int = 300) -> torch.Tensor:
    """w minimizing mean BCE(sigmoid(x w), p) + l2 * |w|^2 * mean(|x|^2) (soft labels, no
    intercept); float64 L-BFGS from w = 0."""
    x, p = x.double(), p.double().clamp(EPS, 1 - EPS)
    scale = (x * x).sum(1).mean()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, p) + l2 * scale * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def log_loss(logits: torch.Tensor, p: torch.Tensor) -> float:
    p = p.double().clamp(EPS, 1 - EPS)
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.double(), p).item()


# -- fine-tuning the top layers ---------------------------------------------------------------------------
@torch.inference_mode()
def residual_states(backbone, seqs: list[list[int]], pad: int, tokens_per_batch: int = 4096,
                    desc: str = "frozen layers") -> list[torch.Tensor]:
    """The residual stream after the backbone's last decoder layer (before the final norm), every
    token of every sequence: [len(seq), hidden] each, in the backbone's dtype."""
    from tqdm import tqdm

    captured = {}
    hook = backbone.layers[-1].register_forward_hook(
        lambda module, args, output: captured.__setitem__("h", output[0] if isinstance(output, tuple) else output))
    out: list[torch.Tensor] = [None] * len(seqs)
    try:
        for idx in tqdm(length_batches([len(s) for s in seqs], tokens_per_batch), desc=desc, unit="batch"):
            width = max(len(seqs[i]) for i in idx)
            ids = torch.tensor([seqs[i] + [pad] * (width - len(seqs[i])) for i in idx])
            mask = torch.tensor([[1] * len(seqs[i]) + [0] * (width - len(seqs[i])) for i in idx])
            backbone(input_ids=ids, attention_mask=mask)
            for row, i in enumerate(idx):
                out[i] = captured["h"][row, : len(seqs[i])].clone()
    finally:
        hook.remove()
    return out


def length_batches(lengths: list[int], tokens_per_batch: int, rng: random.Random | None = None) -> list[list[int]]:
    """Indices grouped by similar length, at most `tokens_per_batch` padded tokens per group;
    the groups shuffled when `rng` is given."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, lo = [], 0
    while lo < len(order):
        hi = lo + 1
        while hi < len(order) and lengths[order[hi]] * (hi - lo + 1) <= tokens_per_batch:
            hi += 1
        groups.append(order[lo:hi])
        lo = hi
    if rng is not None:
        rng.shuffle(groups)
    return groups


def top_model(base: str | Path, first: int, last: int):
    """A one-label LlamaForSequenceClassification of the base's decoder layers first+1..last and
    final norm, reading residual states through `inputs_embeds` (Llama does not scale them)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(base)
    keep_layers(cfg, first, last)
    cfg.num_labels = 1
    top = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).model
    with torch.no_grad():
        for i in range(last - first):
            top.model.layers[i].load_state_dict(full.layers[first + i].state_dict())
        top.model.norm.load_state_dict(full.norm.state_dict())
        torch.nn.init.zeros_(top.score.weight)
    del top.model.embed_tokens  # never used: the input is the residual stream
    top.model.embed_tokens = None
    return top


def top_hidden(top, states: list[torch.Tensor], idx: list[int]) -> torch.Tensor:
    """The top model's final-norm states of sequences idx, right-padded into one batch."""
    width = max(len(states[i]) for i in idx)
    x = torch.zeros(len(idx), width, states[idx[0]].shape[-1], dtype=torch.float32)
    mask = torch.zeros(len(idx), width, dtype=torch.long)
    for row, i in enumerate(idx):
        x[row, : len(states[i])] = states[i].float()
        mask[row, : len(states[i])] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=COMPUTE_DTYPE == torch.bfloat16):
        return top.model(inputs_embeds=x, attention_mask=mask).last_hidden_state


def top_scores(top, states: list[torch.Tensor], positions: list[list[int]], idx: list[int]) -> torch.Tensor:
    """Head outputs of the top model at the listed positions of sequences idx (concatenated)."""
    hidden = top_hidden(top, states, idx)
    rows = torch.cat([torch.full((len(positions[i]),), row) for row, i in enumerate(idx)])
    cols = torch.cat([torch.tensor(positions[i], dtype=torch.long) for i in idx])
    return top.score(hidden[rows, cols].float())[:, 0]


def top_features(top, states, positions, idx_all: list[int], tokens_per_batch: int = 4096) -> torch.Tensor:
    """Final-norm states of the (untrained) top model at the listed positions, in idx_all order."""
    feats = {}
    with torch.inference_mode():
        for idx in length_batches([len(states[i]) for i in idx_all], tokens_per_batch):
            sel = [idx_all[j] for j in idx]
            hidden = top_hidden(top, states, sel)
            for row, i in enumerate(sel):
                feats[i] = hidden[row, positions[i]].float()
    return torch.cat([feats[i] for i in idx_all])


def train_top(top, states, positions, targets: list[torch.Tensor], idx_all: list[int], epochs: int, lr: float,
              seed: int, tokens_per_batch: int = 4096, desc: str = "fine-tuning", head_lr: float | None = None
              ) -> list[float]:
    """Soft-label BCE at every listed position, AdamW (the head at `head_lr`, default 10 x lr),
    float32 weights (bf16 autocast where native); returns the mean training loss of each epoch."""
    from tqdm import tqdm

    head = [top.score.weight]
    body = [p for n, p in top.named_parameters() if not n.startswith("score.")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr}, {"params": head, "lr": head_lr if head_lr is not None else lr * 10}], weight_decay=0.0)
    rng = random.Random(seed)
    losses = []
    top.train()
    for epoch in range(epochs):
        groups = length_batches([len(states[i]) for i in idx_all], tokens_per_batch, rng)
        total, count = 0.0, 0
        bar = tqdm(groups, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch")
        for g in bar:
            idx = [idx_all[j] for j in g]
            y = torch.cat([targets[i] for i in idx]).float().clamp(EPS, 1 - EPS)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(top_scores(top, states, positions, idx), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(top.parameters(), 1.0)
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
            bar.set_postfix(loss=f"{total / count:.4f}")
        losses.append(total / count)
    top.eval()
    return losses


def assemble(base: str | Path, first: int, top, out: Path, meta: dict) -> None:
    """Save the base's embeddings and first `first` decoder layers, then `top`'s layers, final norm
    and head, as one float32 LlamaForSequenceClassification with the base tokenizer and
    pad_token_id = the base's (transformers and alignd pool at the last non-pad token)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    cfg = AutoConfig.from_pretrained(base)
    layers = first + len(top.model.layers)
    keep_layers(cfg, 0, layers)
    one_label(cfg, tokenizer)
    cfg.alignd_reward = meta
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).model
    with torch.no_grad():
        model.model.embed_tokens.load_state_dict(full.embed_tokens.state_dict())
        for i in range(first):
            model.model.layers[i].load_state_dict(full.layers[i].state_dict())
        for i, layer in enumerate(top.model.layers):
            model.model.layers[first + i].load_state_dict(layer.state_dict())
        model.model.norm.load_state_dict(top.model.norm.state_dict())
        model.score.weight.copy_(top.score.weight)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.inference_mode()
def model_scores(folder: Path, seqs: list[list[int]], positions: list[list[int]], tokens_per_batch: int = 2048,
                 desc: str = "scoring (float32)") -> torch.Tensor:
    """A saved reward model's own outputs (float32, as served) at each listed prefix end."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    layers = model.config.num_hidden_layers
    feats = hidden_features(model.model, seqs, positions, (layers,), model.config.pad_token_id, tokens_per_batch, desc)
    return model.score(feats[layers])[:, 0]
