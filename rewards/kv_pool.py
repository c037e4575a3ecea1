"""A compact, slotted KV cache for one guide model: slot i holds the prefix of one request.

Slots stay packed at the front (closing a slot moves the last one into its place), so when a step
touches every open request, in slot order, the attention reads the pool through views: no gather,
no copy. Capacity grows by doubling and the tensors are released when the last slot closes.
"""

from __future__ import annotations

import torch

from alignd.rewards.cached_attention import PrefixKV


class Slot:
    """One request's place in a pool: its index and how many tokens of it are cached."""

    __slots__ = ("index", "length", "last_output")

    def __init__(self, index: int) -> None:
        self.index = index
        self.length = 0
        self.last_output: torch.Tensor | None = None


class KVPool:
    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        max_len: int,
    ) -> None:
        self.shape = (kv_heads, head_dim)
        self.layers, self.dtype, self.device, self.max_len = layers, dtype, device, max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.slots: list[Slot] = []

    def __len__(self) -> int:
        return len(self.slots)

    def capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def open(self) -> Slot:
        slot = Slot(len(self.slots))
        self.slots.append(slot)
        self.reserve(len(self.slots), 1)
        return slot

    def close(self, slot: Slot) -> None:
        last = self.slots.pop()
        if last is not slot:
            i, j = slot.index, last.index
            for t in self.keys + self.values:
                t[i, :, : last.length] = t[j, :, : last.length]
            last.index = i
            self.slots[i] = last
        slot.index = -1
        if not self.slots:
            self.keys, self.values = [], []

    def reserve(self, slots: int, length: int) -> None:
        """Make room for `slots` slots of `length` tokens each (doubling, capped at max_len)."""
        if length > self.max_len:
            raise ValueError(f"guide cache holds at most {self.max_len} tokens, asked {length}")
        have_s, have_t = self.capacity()
        if slots <= have_s and length <= have_t:
            return
        new_s = max(slots, 2 * have_s, 4) if slots > have_s else have_s
        # Room to grow: a prompt of L tokens gets about L/2 tokens of decoding before a copy.
        new_t = min(max(length + length // 2 + 64, 2 * have_t), self.max_len) if length > have_t else have_t
        used = max((s.length for s in self.slots), default=0)
        for store in (self.keys, self.values):
            for i in range(self.layers):
                # Zeros, not empty: masked positions get weight 0, and 0 * NaN garbage is NaN.
                fresh = torch.zeros(
                    (new_s, self.shape[0], new_t, self.shape[1]), dtype=self.dtype, device=self.device
                )
                if i < len(store):
                    fresh[:have_s, :, :used] = store[i][:, :, :used]
                    store[i] = fresh
                else:
                    store.append(fresh)

    def prefix(self, slots: list[Slot]) -> PrefixKV:
        """The cached prefixes of `slots`, in that order; views when they are the whole pool."""
        t = max((s.length for s in slots), default=0)
        lengths = torch.tensor([s.length for s in slots], device=self.device)
        if [s.index for s in slots] == list(range(len(self.slots))):
            return PrefixKV(
                [k[: len(slots), :, :t] for k in self.keys],
                [v[: len(slots), :, :t] for v in self.values],
                lengths,
            )
        idx = torch.tensor([s.index for s in slots], device=self.device)
        return PrefixKV(
            [k[:, :, :t].index_select(0, idx) for k in self.keys],
            [v[:, :, :t].index_select(0, idx) for v in self.values],
            lengths,
        )

    def copy(self, source: Slot, targets: list[Slot]) -> None:
        """Give every target slot the source's cached prefix."""
        idx = torch.tensor([t.index for t in targets], device=self.device)
        for t in self.keys + self.values:
            t[idx, :, : source.length] = t[source.index, :, : source.length]

    def write(
        self,
        slot_index: torch.Tensor,
        position: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
    ) -> None:
        """Store per-layer keys/values [M, KVH, D] at (slot_index[m], position[m])."""
        for layer in range(self.layers):
            self.keys[layer][slot_index, :, position] = keys[layer]
            self.values[layer][slot_index, :, position] = values[layer]
