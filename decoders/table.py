"""Every decoder alignd serves, declared once.

The request schema (which names `alignment.decoder` accepts and what each needs), the server's
checks, its dispatch (in the engine or per request), the logits processor and `/v1/models` all
read this table. Adding a decoder is its file, one line here, and its tests (README: "Adding a
decoder").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from alignd.decoders import args, best_of_n, blockwise, dera, transfer_q, vas
from alignd.decoders.base import Step

# What a decoder uses: guides a request weights ("rewards", "values") or models the server loads
# at start-up ("reference"; "baseline" defaults to the served model).
Need = Literal["rewards", "values", "reference", "baseline"]
Rank = Callable[[Sequence[float | None]], "int | None"]


@dataclass(frozen=True)
class Decoder:
    name: str
    needs: frozenset[Need]
    step: Step | None = None  # in the engine: rewrites (or, beside `rank`, only reads) every token step
    rank: Rank | None = None  # per request: picks one of alignment.n whole samples by their totals
    blocks: bool = False  # with rank: picks one of alignment.n blocks, round after round (streams)
    own_support: bool = False  # its candidates are the whole support: top-p must not cut them
    # The `alignment` fields it reads (decoders/params.py, by their JSON names): a request that
    # sets another one is refused, not silently ignored.
    params: tuple[str, ...] = ()


DECODERS: dict[str, Decoder] = {d.name: d for d in (
    Decoder("args", frozenset({"rewards"}), step=args.step, own_support=True,
            params=("rewards", "top_k", "reward_cache")),
    Decoder("best_of_n", frozenset({"rewards"}), step=best_of_n.observe, rank=best_of_n.pick,
            params=("rewards", "n", "return_candidates", "prune")),
    Decoder("blockwise", frozenset({"rewards"}), rank=blockwise.pick, blocks=True,
            params=("rewards", "n", "block_tokens")),
    Decoder("transfer_q", frozenset({"rewards", "baseline"}), step=transfer_q.step, own_support=True,
            params=("rewards", "top_k", "rollout_tokens", "reward_cache")),
    Decoder("vas", frozenset({"values"}), step=vas.step, params=("values", "top_k", "reward_cache")),
    Decoder("dera", frozenset({"reference"}), step=dera.step, params=("lambda",)),
)}
