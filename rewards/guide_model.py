"""One loaded neural guide (reward, value, reference or baseline LM) and its per-request KV cache.

Each step a guide is first *synced* (its cache brought up to the request's current tokens), then
asked for what the decoder needs: scores of k candidates against the shared prefix, or the head
output at the last token. Syncing after ARGS-like steps costs no forward at all: the chosen token
was one of last step's candidates, whose keys/values were kept, so they are written into the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from alignd.rewards import cached_attention
from alignd.rewards.kv_pool import KVPool, Slot

Head = Literal["score", "lm"]

# Tokens per forward: whole runs (prompt sync, uncached scoring) and branches (candidates,
# rollouts to score) are cut into forwards of about this many tokens, so that activations stay
# bounded however many rows a step brings (a single row's branches are one forward: the server
# bounds them per request with max_guide_tokens_per_step).
SEQUENCE_TOKENS = 8192
BRANCH_TOKENS = 4096
# Bytes of rollout keys/values (every branch's tokens beyond the prefix) one batched rollout holds.
ROLLOUT_BYTES = 512 * 2**20


@dataclass(eq=False)
class _Kept:
    """Keys/values of the first token of every branch of one scoring call: per layer
    [rows, branches, kv_heads, head_dim]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]


@dataclass
class _Entry:
    kept: _Kept
    row: int
    ids: list[int]  # the branches' first tokens
    length: int  # the slot's cached length they extend


class GuideModel:
    def __init__(self, model: PreTrainedModel, head: Head, max_len: int) -> None:
        cfg = model.config
        self.model, self.head = model.eval(), head
        self.spec = model.name_or_path
        # transformers' sequence classifiers pool at the last token that is not padding: a
        # reward of text ending in pad tokens is the reward of the text before them.
        self.pad_id = cfg.pad_token_id if head == "score" else None
        self.vocab_size = cfg.vocab_size
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.pool = KVPool(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            self.dtype,
            self.device,
            max_len,
        )
        self._kept: dict[int, _Entry] = {}  # id(slot) -> its candidates' keys/values

    # -- per-request state -------------------------------------------------------------------
    # The pool's tensors are made under inference mode; so must every in-place change be.
    @torch.inference_mode()
    def open(self) -> Slot:
        return self.pool.open()

    @torch.inference_mode()
    def close(self, slot: Slot) -> None:
        self._kept.pop(id(slot), None)
        self.pool.close(slot)

    # -- the maths ----------------------------------------------------------------------------
    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head == "score":
            return self.model.score(hidden)[..., 0].float()
        return self.model.lm_head(hidden).float()

    def _tokens(self, ids) -> torch.Tensor:
        # Ids the guide does not know (a base model's padded vocabulary) must not index past
        # its embedding; such tokens carry no probability mass in the base model anyway.
        t = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        return t.clamp_(0, self.vocab_size - 1)

    @torch.inference_mode()
    def sync(self, slots: list[Slot], seqs: list[list[int]]) -> None:
        """Bring each slot's cache up to its full sequence."""
        commits: list[tuple[Slot, _Entry, int]] = []
        runs: list[tuple[Slot, list[int]]] = []
        for slot, seq in zip(slots, seqs):
            if len(seq) < slot.length:  # the engine re-ran this request: start over
                slot.length = 0
            new = seq[slot.length :]
            if not new:
                continue
            entry = self._kept.pop(id(slot), None)
            if len(new) == 1 and entry is not None and entry.length == slot.length and new[0] in entry.ids:
                commits.append((slot, entry, entry.ids.index(new[0])))
            else:
                runs.append((slot, new))
        self.pool.reserve(len(self.pool), max((len(q) for q in seqs), default=1))
        if commits:
            self._commit(commits)
        if runs:
            self._extend_runs(runs)

    def _commit(self, commits: list[tuple[Slot, _Entry, int]]) -> None:
        keys: list[list[torch.Tensor]] = [[] for _ in range(self.pool.layers)]
        values: list[list[torch.Tensor]] = [[] for _ in range(self.pool.layers)]
        by_call: dict[int, list[tuple[Slot, _Entry, int]]] = {}
        for c in commits:
            by_call.setdefault(id(c[1].kept), []).append(c)
        ordered = [c for group in by_call.values() for c in group]
        for group in by_call.values():
            kept = group[0][1].kept
            rows = torch.tensor([e.row for _, e, _ in group], device=self.device)
            cols = torch.tensor([col for _, _, col in group], device=self.device)
            for layer in range(self.pool.layers):
                keys[layer].append(kept.keys[layer][rows, cols])
                values[layer].append(kept.values[layer][rows, cols])
        self.pool.write(
            torch.tensor([s.index for s, _, _ in ordered], device=self.device),
            torch.tensor([s.length for s, _, _ in ordered], device=self.device),
            [torch.cat(k) for k in keys],
            [torch.cat(v) for v in values],
        )
        for slot, _, _ in ordered:
            slot.length += 1
            slot.last_output = None

    def _extend_runs(self, runs: list[tuple[Slot, list[int]]]) -> None:
        # Rows that start from nothing with the same tokens (the n samples of one prompt) are
        # run once; the others copy the result.
        twins: dict[tuple[int, ...], list[Slot]] = {}
        distinct: list[tuple[Slot, list[int]]] = []
        for slot, new in runs:
            if slot.length == 0:
                group = twins.setdefault(tuple(new), [])
                if group:
                    group.append(slot)
                    continue
                group.append(slot)
            distinct.append((slot, new))
        distinct.sort(key=lambda r: len(r[1]), reverse=True)
        start = 0
        while start < len(distinct):
            per_row = len(distinct[start][1])
            end = min(len(distinct), start + max(1, SEQUENCE_TOKENS // per_row))
            batch = distinct[start:end]
            self._extend([s for s, _ in batch], [n for _, n in batch])
            start = end
        for group in twins.values():
            if len(group) > 1:
                self.pool.copy(group[0], group[1:])
                for slot in group[1:]:
                    slot.length, slot.last_output = group[0].length, group[0].last_output

    def _extend(self, slots: list[Slot], new: list[list[int]]) -> None:
        order = sorted(range(len(slots)), key=lambda i: slots[i].index)
        slots, new = [slots[i] for i in order], [new[i] for i in order]
        width = max(len(n) for n in new)
        tokens = self._tokens([n + [0] * (width - len(n)) for n in new])
        counts = torch.tensor([len(n) for n in new], device=self.device)
        prefix = self.pool.prefix(slots)
        positions = prefix.lengths[:, None] + torch.arange(width, device=self.device)[None]
        mask = cached_attention.causal_mask(counts, width)
        hidden, keys, values = cached_attention.forward(self.model, tokens, positions, prefix, mask)
        valid = torch.arange(width, device=self.device)[None] < counts[:, None]
        slot_index = torch.tensor([s.index for s in slots], device=self.device)[:, None].expand_as(valid)
        self.pool.write(
            slot_index[valid],
            positions[valid],
            [k.transpose(1, 2)[valid] for k in keys],
            [v.transpose(1, 2)[valid] for v in values],
        )
        last = hidden[torch.arange(len(slots), device=self.device), counts - 1]
        outputs = self._head(last)
        for i, (slot, n) in enumerate(zip(slots, new)):
            slot.length += len(n)
            slot.last_output = outputs[i]

    @torch.inference_mode()
    def last_outputs(self, slots: list[Slot], seqs: list[list[int]]) -> torch.Tensor:
        """Head output at each sequence's last token ([n] scores or [n, vocab] logits)."""
        self.sync(slots, seqs)
        stale = [(s, q) for s, q in zip(slots, seqs) if s.last_output is None]
        for slot, seq in stale:  # reached through a candidate commit: recompute its last token
            slot.length -= 1
        if stale:
            self._extend([s for s, _ in stale], [q[-1:] for _, q in stale])
        return torch.stack([s.last_output for s in slots])

    def _ordered(self, slots: list[Slot]) -> tuple[list[Slot], torch.Tensor, torch.Tensor]:
        """Slots sorted by pool index (so the pool is read through views), the permutation, and
        its inverse to put results back in the caller's order."""
        order = torch.tensor(sorted(range(len(slots)), key=lambda i: slots[i].index), device=self.device)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=self.device)
        return [slots[i] for i in order.tolist()], order, inverse

    def _keep_first(self, ordered: list[Slot], tokens: torch.Tensor, keys, values, columns) -> None:
        """Keep the keys/values of each branch's first token: next step's sync commits the chosen
        one into the cache instead of running a forward."""
        kept = _Kept([t[:, :, columns].transpose(1, 2) for t in keys], [t[:, :, columns].transpose(1, 2) for t in values])
        for i, (slot, ids) in enumerate(zip(ordered, tokens.tolist())):
            self._kept[id(slot)] = _Entry(kept, i, ids, slot.length)

    @torch.inference_mode()
    def score_branches(
        self, slots: list[Slot], seqs: list[list[int]], tokens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Head outputs [n, k] at the end of seq + branch for k branches per row.

        tokens [n, k, span] holds each branch's tokens (the first is a candidate next token),
        lengths [n, k] how many are real. The branches of a group of rows run in one forward
        against the shared cached prefixes, each branch seeing only the prefix and its own tokens."""
        self.sync(slots, seqs)
        ordered, order, inverse = self._ordered(slots)
        tokens, lengths = tokens.to(self.device)[order], lengths.to(self.device)[order]
        rows = max(1, BRANCH_TOKENS // (tokens.shape[1] * tokens.shape[2]))
        out = [
            self._score_group(ordered[i : i + rows], [seqs[j] for j in order[i : i + rows].tolist()],
                              tokens[i : i + rows], lengths[i : i + rows])
            for i in range(0, len(ordered), rows)
        ]
        return torch.cat(out)[inverse]

    def _score_group(self, slots: list[Slot], seqs: list[list[int]], tokens: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
        n, k, span = tokens.shape
        prefix = self.pool.prefix(slots)
        steps = torch.arange(span, device=self.device).repeat(k)
        positions = prefix.lengths[:, None] + steps[None]
        mask = cached_attention.branch_mask(lengths, span)
        hidden, keys, values = cached_attention.forward(
            self.model, self._tokens(tokens.reshape(n, k * span)), positions, prefix, mask
        )
        first = torch.arange(k, device=self.device) * span
        self._keep_first(slots, tokens[:, :, 0], keys, values, first)
        pooled = self._last_real(tokens, lengths)
        h = hidden.gather(1, (first[None] + pooled.clamp(min=0))[..., None].expand(n, k, hidden.shape[-1]))
        out = self._head(h)
        if (pooled < 0).any():  # a branch of padding only: its reward is that of the prefix
            empty = (pooled < 0).any(-1).nonzero().flatten().tolist()
            prefix_scores = self.score_sequences([seqs[i] for i in empty])
            for i, score in zip(empty, prefix_scores):
                out[i] = torch.where(pooled[i] < 0, score, out[i])
        return out

    def _last_real(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Index of the last non-padding token within each run ([..., span] -> [...]); -1 when
        there is none (pooling then falls back to what precedes the run)."""
        steps = torch.arange(tokens.shape[-1], device=tokens.device)
        real = steps < lengths[..., None]
        if self.pad_id is not None:
            real &= tokens != self.pad_id
        return torch.where(real.any(-1), (steps * real).argmax(-1), -1)

    def score_candidates(self, slots: list[Slot], seqs: list[list[int]], cands: torch.Tensor) -> torch.Tensor:
        """Head outputs [n, k] of seq + [c] for each row's k candidate tokens."""
        return self.score_branches(slots, seqs, cands[:, :, None], torch.ones_like(cands))

    @torch.inference_mode()
    def rollout(
        self, slots: list[Slot], seqs: list[list[int]], cands: torch.Tensor, steps: int, eos: int | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy continuations of seq + [c] for each candidate c, the candidates of a group of
        rows in one batched generation that forks every row's cached prefix (no prompt is re-run).

        Returns tokens [n, k, steps] and lengths [n, k] (a branch ends with its first eos)."""
        self.sync(slots, seqs)
        ordered, order, inverse = self._ordered(slots)
        cands = cands.to(self.device)[order]
        kvh, head_dim = self.pool.shape
        per_row = 2 * self.pool.layers * kvh * cands.shape[1] * steps * head_dim * self.dtype.itemsize
        rows = max(1, min(ROLLOUT_BYTES // per_row, BRANCH_TOKENS // cands.shape[1]))
        parts = [self._rollout_group(ordered[i : i + rows], cands[i : i + rows], steps, eos)
                 for i in range(0, len(ordered), rows)]
        return torch.cat([t for t, _ in parts])[inverse], torch.cat([n for _, n in parts])[inverse]

    def _rollout_group(self, slots: list[Slot], cur: torch.Tensor, steps: int,
                       eos: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, k = cur.shape
        prefix = self.pool.prefix(slots)
        kvh, head_dim = self.pool.shape

        def buffers() -> list[torch.Tensor]:
            shape = (n, kvh, k, steps, head_dim)
            return [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(self.pool.layers)]

        past = cached_attention.BranchKV(buffers(), buffers())
        alive = cur != eos if eos is not None else torch.ones_like(cur, dtype=torch.bool)
        lengths = torch.zeros_like(cur)
        out = torch.zeros((n, k, steps), dtype=torch.long, device=self.device)
        for t in range(steps):
            if not alive.any():
                break
            positions = prefix.lengths[:, None] + t
            # Branch j sees the prefix, its own earlier tokens and itself.
            mask = torch.ones((1, 1, 1, t + 1), dtype=torch.bool, device=self.device).expand(n, k, 1, t + 1)
            hidden, keys, values = cached_attention.forward(self.model, self._tokens(cur), positions.expand(n, k), prefix,
                                                 mask, past)
            if t == 0:
                self._keep_first(slots, cur, keys, values, torch.arange(k, device=self.device))
            nxt = self._head(hidden).argmax(-1)
            out[:, :, t] = torch.where(alive, nxt, 0)
            lengths += alive.long()
            if eos is not None:
                alive = alive & (nxt != eos)
            cur = nxt
        return out, lengths

    @torch.inference_mode()
    def score_sequences(self, seqs: list[list[int]]) -> torch.Tensor:
        """Head output at the last token of each whole sequence, recomputed without any cache."""
        out = []
        step = max(1, SEQUENCE_TOKENS // max(len(s) for s in seqs))
        for start in range(0, len(seqs), step):
            batch = seqs[start : start + step]
            width = max(len(s) for s in batch)
            tokens = self._tokens([s + [0] * (width - len(s)) for s in batch])
            counts = torch.tensor([len(s) for s in batch], device=self.device)
            empty = torch.empty((len(batch), *self.pool.shape[:1], 0, self.pool.shape[1]),
                                dtype=self.dtype, device=self.device)
            layers = self.pool.layers
            prefix = cached_attention.PrefixKV([empty] * layers, [empty] * layers, torch.zeros_like(counts))
            positions = torch.arange(width, device=self.device)[None].expand(len(batch), width)
            hidden, _, _ = cached_attention.forward(
                self.model, tokens, positions, prefix, cached_attention.causal_mask(counts, width)
            )
            out.append(self._head(hidden[torch.arange(len(batch)), self._last_real(tokens, counts).clamp(min=0)]))
        return torch.cat(out)
