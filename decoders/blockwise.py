"""Blockwise search: controlled decoding, blockwise (Mudgal et al., ICML 2024; CARDS, Li et al., 2024).

    repeat until end of text or max_tokens:
        y_1 .. y_n ~ π(· | x, y)                            n blocks of block_tokens, the request's sampling
        y ← y ⊕ argmax_{y_j} Σ_i w_i · r_i([x, y, y_j])

A request-level decoder like best-of-n, one block at a time: the server draws each round's n
blocks as one engine request from the accepted prefix (vLLM's prefix caching keeps the base
model's keys/values of it), the worker scores them as branches of one tree-masked forward per
reward against the search's cached reward prefix, and the best block is streamed at once
(server/block_search.py). A block one of whose rewards failed has no total and is not picked.
"""

from __future__ import annotations

from alignd.decoders.best_of_n import pick

__all__ = ["pick"]  # the argmax over the round's blocks is best-of-n's
