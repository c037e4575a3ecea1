"""The one vLLM logits processor (V1 interface) that runs every in-engine decoder.

Each step it groups the batch rows by decoder and calls each decoder once with all its rows.
Rows without `alignment` are never touched, so plain requests keep plain vLLM speed.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from alignd.decoders import args, dera, transfer_q, vas
from alignd.decoders.base import Row, Step
from alignd.decoders.params import from_extra_args
from alignd.rewards.runtime import GuideRuntime
from alignd.rewards.specs import GuideConfig

log = logging.getLogger("alignd.decoders")

DECODERS: dict[str, Step] = {"args": args.step, "transfer_q": transfer_q.step, "vas": vas.step, "dera": dera.step}


class AlignmentLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        params = from_extra_args(sampling_params.extra_args)  # raises ValueError -> HTTP 400
        if params is not None and params.decoder not in DECODERS:
            raise ValueError(f"decoder {params.decoder!r} does not run inside the engine")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        mc = vllm_config.model_config
        raw = (vllm_config.additional_config or {}).get("alignd")
        config = GuideConfig.model_validate(raw) if raw else GuideConfig(model=mc.model)
        self.guides = GuideRuntime.get(config, device, mc.dtype, mc.max_model_len)
        self.rows: dict[int, Row] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def _drop(self, index: int) -> None:
        row = self.rows.pop(index, None)
        if row is not None:
            row.release(self.guides)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._drop(index)
        for index, params, prompt, output in batch_update.added:
            self._drop(index)
            alignment = from_extra_args(params.extra_args)
            if alignment is not None and alignment.decoder in DECODERS:
                request_id = str(params.extra_args.get("alignd_request", ""))
                self.rows[index] = Row(alignment, request_id, list(prompt or []), output)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if direction is MoveDirectionality.SWAP:
                if row_b is not None:
                    self.rows[a] = row_b
            elif row_b is not None:
                row_b.release(self.guides)
            if row_a is not None:
                self.rows[b] = row_a

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        started = time.perf_counter()
        groups: dict[str, list[int]] = defaultdict(list)
        for index, row in self.rows.items():
            if index < logits.shape[0]:
                groups[row.params.decoder].append(index)
        for decoder, indices in groups.items():
            rows = [self.rows[i] for i in indices]
            index = torch.tensor(indices, device=logits.device)
            try:
                logits[index] = DECODERS[decoder](self.guides, rows, [r.tokens() for r in rows], logits[index])
            except Exception as e:  # never take the engine (and every other request) down
                log.exception("alignd: %s step failed; these rows continue unguided", decoder)
                for row in rows:
                    self.guides.note(row.request_id, f"{decoder} step failed ({type(e).__name__}: {e})")
        self.guides.record_step(started)
        return logits
