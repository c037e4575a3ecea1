"""What a guided row costs the shared engine step, counted in guide tokens.

One guide token is one token position run through one guide model in a step. The server adds
them up to admit a request only while the step's budget has room, and the processor uses them to
cut a step's rows into chunks of bounded size. The count is an estimate of compute, not of time:
it leaves out attention over the cached prefix (which grows with the context) and the one-off
prefill of a row's prompt into each guide's cache.
"""

from __future__ import annotations

from collections.abc import Mapping

from alignd.decoders.params import AlignmentParams
from alignd.rewards.specs import Route

# A Python text reward is charged one guide token per text it reads: its time is bounded by its
# own time limit, not by this count.
TEXT_TOKEN = 1


# The request field that weights each kind of scorer a decoder may need.
SCORERS = {"rewards": "reward", "values": "value"}


def branch_span(al: AlignmentParams) -> int:
    """Tokens in each branch a scorer reads: the candidate, plus the baseline's rollout."""
    return 1 + al.rollout_tokens if "baseline" in al.method.needs else 1


def candidate_tokens(al: AlignmentParams) -> int:
    """Branch tokens one row asks of each scorer per step (top_k x span; 1 for a reference's
    next token), the number the per-request limit `max_guide_tokens_per_step` applies to."""
    if al.method.needs & SCORERS.keys():
        return al.branches * branch_span(al)
    return 1 if "reference" in al.method.needs else 0


def candidate_formula(al: AlignmentParams) -> str:
    if al.method.needs & SCORERS.keys() and al.branches > 1:
        return "top_k x (1 + rollout_tokens)" if branch_span(al) > 1 else "top_k"
    return "1"


def guide_tokens(al: AlignmentParams, routes: Mapping[tuple[str, str], Route], context: int) -> int:
    """Guide tokens one in-engine row costs per step, `context` tokens into its sequence: each
    scorer's branch tokens (recomputed scorers re-read the whole context for every branch), the
    baseline's rollout tokens, the reference's one token."""
    k, span, needs = al.branches, branch_span(al), al.method.needs
    total = 0
    for field, kind in SCORERS.items():
        for name in getattr(al, field) if field in needs else ():
            route = routes.get((kind, name), Route.cached)
            if route is Route.text:
                total += k * TEXT_TOKEN
            elif route is Route.cached and al.reward_cache:
                total += k * span
            else:
                total += k * (context + span)
    if "baseline" in needs:
        total += k * al.rollout_tokens
    if "reference" in needs:
        total += 1
    return total
