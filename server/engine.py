"""The vLLM engine as the server sees it: start-up, prompts to token ids, generation, and the
calls into the worker that reach the guide models (final rewards, statistics)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import RequestOutput
from vllm.v1.engine.async_llm import AsyncLLM

from alignd.decoders.processor import AlignmentLogitsProcessor
from alignd.rewards.specs import GuideConfig
from alignd.server.config import ServeSettings

log = logging.getLogger("alignd.server")


class Engine:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self.llm: AsyncLLM | None = None
        self.max_model_len = 0

    def engine_args(self) -> AsyncEngineArgs:
        s = self.settings
        guides = GuideConfig(
            model=s.model, rewards=s.rewards, values=s.values, reference=s.reference, baseline=s.baseline
        )
        return AsyncEngineArgs(
            model=s.model,
            served_model_name=[s.model_name],
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            gpu_memory_utilization=s.gpu_memory_utilization,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            seed=s.seed,
            logits_processors=[AlignmentLogitsProcessor],
            worker_extension_cls="alignd.rewards.worker.GuideWorkerExtension",
            additional_config={"alignd": guides.model_dump()},
            enable_log_requests=False,
        )

    def start(self) -> None:
        # Model Runner V2 (vLLM's CUDA default) refuses V1-interface logits processors; the
        # V1 runner serves them everywhere. The CPU build always runs V1.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        self.llm = AsyncLLM.from_engine_args(self.engine_args())
        self.max_model_len = self.llm.model_config.max_model_len

    def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        assert self.llm is not None, "engine not started"
        return self.llm.generate({"prompt_token_ids": prompt}, params, request_id)

    async def finish(self, seqs: list[list[int]], names: list[str], request_id: str) -> dict[str, Any]:
        """Rewards of finished sequences from the worker's guide models, and the request's notes."""
        assert self.llm is not None, "engine not started"
        return (await self.llm.collective_rpc("alignd_finish", args=(seqs, names, request_id)))[0]

    async def stats(self) -> dict[str, float]:
        assert self.llm is not None, "engine not started"
        return (await self.llm.collective_rpc("alignd_stats"))[0]

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored
