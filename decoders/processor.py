"""The one vLLM logits processor (V1 interface) that runs every in-engine decoder.

Each step it groups the batch rows by decoder and calls each decoder once with all its rows (the
guide models cut their forwards into blocks of bounded size). Rows without `alignment` are never
touched, so plain requests keep plain vLLM speed.

A guide failure stays with the rows it touched. When a guide fails for a row (raises, returns a
non-finite score, runs past its time limit) that row is decoded unguided from then on, with one
note; a call that fails without saying which row caused it is re-run one row at a time, so the
other rows stay guided. A row whose guide is only briefly unavailable (a text reward restarting)
takes that step unguided.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from alignd.decoders.base import GuideFailure, Row
from alignd.decoders.cost import guide_tokens
from alignd.decoders.params import from_extra_args
from alignd.rewards.runtime import GuideRuntime
from alignd.rewards.specs import GuideConfig

log = logging.getLogger("alignd.decoders")


class AlignmentLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        from_extra_args(sampling_params.extra_args)  # raises ValueError -> HTTP 400

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        mc = vllm_config.model_config
        raw = (vllm_config.additional_config or {}).get("alignd")
        config = GuideConfig.model_validate(raw) if raw else GuideConfig(model=mc.model)
        self.guides = GuideRuntime.get(config, device, mc.dtype, mc.max_model_len)
        self.routes = {(kind, name): scorer.route for kind, group in self.guides.scorers.items()
                       for name, scorer in group.items()}
        self.rows: dict[int, Row] = {}
        # Rows out of the batch for a step or more (the scheduler held them, see scheduler.py),
        # by their request's SamplingParams, which the engine keeps until the request ends.
        self.parked: dict[int, Row] = {}
        self.guides.sweepers.append(self._sweep)

    def is_argmax_invariant(self) -> bool:
        return False

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is None:
            return
        if self.guides.runner is None:  # no way to tell a held request from a finished one
            row.release()
        else:
            self.parked[id(row.sampling)] = row

    def _sweep(self) -> int:
        """Release the parked rows whose requests have ended; return how many stay parked (held
        out of the step by the guide budget, or preempted)."""
        if not self.parked:
            return 0
        live = {id(state.sampling_params) for state in self.guides.runner.requests.values()}
        for key in [k for k in self.parked if k not in live]:
            self.parked.pop(key).release()
        return len(self.parked)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, output in batch_update.added:
            self._drop(index)
            row = self.parked.pop(id(params), None)
            if row is not None:  # back from a held step, its guide caches intact
                row.output = output
                self.rows[index] = row
                continue
            guided = from_extra_args(params.extra_args)
            if guided is not None:
                row = Row(guided.alignment, guided.request_id, list(prompt or []), output, params, sample=guided.sample)
                self.rows[index] = row
                if row.sample:  # the server reads a pruning sample's checkpoint rewards
                    self.guides.observe(row.request_id, row.sample, row.observed)
        for a, b, direction in batch_update.moved:
            if direction is MoveDirectionality.SWAP:
                row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
                if row_b is not None:
                    self.rows[a] = row_b
                if row_a is not None:
                    self.rows[b] = row_a
            else:
                self._drop(b)
                if (row := self.rows.pop(a, None)) is not None:
                    self.rows[b] = row

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        self._sweep()
        if not self.rows:
            return logits
        started = time.perf_counter()
        groups: dict[str, list[int]] = defaultdict(list)
        for index, row in self.rows.items():
            if index < logits.shape[0] and row.failure is None:
                groups[row.params.decoder].append(index)
        spent = sum(self._run(decoder, indices, logits) for decoder, indices in groups.items())
        self.guides.record_step(started, spent)
        return logits

    def _cost(self, row: Row) -> int:
        context = len(row.prompt) + len(row.output)
        # A row's first step also fills its guides' caches with its prompt.
        return guide_tokens(row.params, self.routes, context) + (0 if row.guides else context)

    def _run(self, decoder: str, indices: list[int], logits: torch.Tensor) -> int:
        """Guide `indices` in place in `logits`; return the guide tokens spent."""
        rows = [self.rows[i] for i in indices]
        for row in rows:
            row.skipped = None
        spent = sum(self._cost(row) for row in rows)
        index = torch.tensor(indices, device=logits.device)
        try:
            step = rows[0].params.method.step
            assert step is not None  # from_extra_args admits only in-engine decoders
            out = step(self.guides, rows, [r.tokens() for r in rows], logits[index])
        except Exception as e:  # never take the engine (and every other request) down
            if len(rows) > 1:  # find the row it belongs to; the others stay guided
                return sum(self._run(decoder, [i], logits) for i in indices)
            log.warning("alignd: %s step failed for one row", decoder, exc_info=True)
            guide, reason = (e.guide, e.reason) if isinstance(e, GuideFailure) else (decoder, f"{type(e).__name__}: {e}")
            self._fail(rows[0], guide, reason)
            return spent
        finite = torch.isfinite(out).any(-1) & ~torch.isnan(out).any(-1) & ~(out == float("inf")).any(-1)
        keep = []
        for j, (row, ok) in enumerate(zip(rows, finite.tolist())):
            if row.failure is not None:
                self._fail(row, *row.failure)
            elif row.skipped is not None:
                guide, reason = row.skipped
                self.guides.failed(guide)
                self.guides.note(row.request_id, f"{decoder}: {guide} was not available ({reason}); "
                                                 "tokens decoded unguided meanwhile")
            elif not ok:
                self._fail(row, "the guided scores", "not finite: a weight too large for its guide's scores?")
            else:
                keep.append(j)
        if keep:
            chosen = torch.tensor(keep, device=logits.device)
            logits[index[chosen]] = out[chosen]
        return spent

    def _fail(self, row: Row, guide: str, reason: str) -> None:
        row.failure = (guide, reason)
        row.release()
        self.guides.failed(guide)
        self.guides.note(row.request_id, f"{row.params.decoder}: {guide} failed ({reason}); "
                                         "this choice continued unguided")
