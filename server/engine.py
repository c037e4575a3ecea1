"""The vLLM engine as the server sees it: start-up, prompts to token ids, generation, and the
calls into the worker that reach the guide models (final rewards, statistics).

Every call into the worker has a time limit and fails at once when the engine dies (vLLM does
not fail a pending `collective_rpc` when its engine core process goes away).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from transformers import AutoTokenizer
from vllm import SamplingParams
from vllm.sampling_params import RequestOutputKind
from vllm.config import SchedulerConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from alignd.decoders.processor import AlignmentLogitsProcessor
from alignd.decoders.scheduler import GuideBudgetAsyncScheduler, GuideBudgetScheduler
from alignd.rewards.specs import GuideConfig, GuideSettings, Route
from alignd.server.config import ServeSettings

log = logging.getLogger("alignd.server")


def whole_prefills(scheduler: SchedulerConfig, max_model_len: int) -> None:
    """vLLM's CPU build kills the engine when a seeded request's prompt is prefilled over several
    steps (it rewinds the request's random generator, which a CPU generator cannot do): prefill
    each prompt in one step instead, as the CPU platform itself does for MLA models."""
    scheduler.enable_chunked_prefill = False
    scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, max_model_len)


class Engine:
    def __init__(self, settings: ServeSettings, routes: dict[tuple[str, str], Route] | None = None) -> None:
        self.settings = settings
        self.routes = routes or {}  # how each reward and value runs (start-up checks), for costs
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        # Token ids a prompt may hold (vLLM's own bound), and the most characters one token spans.
        self.vocab_limit = len(self.tokenizer)
        self.max_token_chars = max(len(t) for t in self.tokenizer.get_vocab())
        self.llm: AsyncLLM | None = None
        self.max_model_len = 0
        self.dead = asyncio.Event()
        self._stats: dict[str, Any] | None = None
        self._stats_call: asyncio.Future | None = None

    def engine_args(self) -> AsyncEngineArgs:
        s = self.settings
        guides = GuideConfig(
            model=s.model, **s.model_dump(include=set(GuideSettings.model_fields)),
            routes={f"{kind}/{name}": route for (kind, name), route in self.routes.items()},
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
            # A token's logprob is taken from the distribution it was sampled from: after the
            # decoder's guidance (server/logprobs.py).
            logprobs_mode="processed_logprobs",
        )

    def start(self) -> None:
        # Model Runner V2 (vLLM's CUDA default) refuses V1-interface logits processors; the
        # V1 runner serves them everywhere. The CPU build always runs V1.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        args = self.engine_args()
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        if config.use_v2_model_runner:  # forced by the environment or by a feature that needs V2
            raise RuntimeError("vLLM chose Model Runner V2, which refuses alignd's V1-interface logits processor: "
                               "set VLLM_USE_V2_MODEL_RUNNER=0 (deploy/README.md: what a V2 port needs)")
        if current_platform.is_cpu():
            whole_prefills(config.scheduler_config, config.model_config.max_model_len)
        # vLLM's own scheduler (async or not, as vLLM chose), with the guide budget mixed in.
        config.scheduler_config.scheduler_cls = (
            GuideBudgetAsyncScheduler if config.scheduler_config.async_scheduling else GuideBudgetScheduler
        )
        self.llm = AsyncLLM.from_vllm_config(config, enable_log_requests=args.enable_log_requests,
                                             disable_log_stats=args.disable_log_stats)
        self.max_model_len = self.llm.model_config.max_model_len
        self.vocab_limit = max(self.vocab_limit, self.llm.model_config.get_vocab_size())

    def shutdown(self, timeout: float = 1.0) -> None:
        """Stop the engine; a core still busy in a step after `timeout` seconds is killed (the
        requests in flight are already answered or given up by then)."""
        if self.llm is not None:
            llm, self.llm = self.llm, None
            llm.shutdown(timeout=timeout)

    # -- prompts --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict[str, str]], variables: dict[str, Any] | None = None,
                    generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the chat template (with the assistant's turn opened,
        unless not `generation_prompt`), given the request's extra template `variables`;
        ValueError when the template fails on them."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                      tokenize=False, **(variables or {}))
        except Exception as e:  # noqa: BLE001 - raise_exception, or what the request's messages and variables do to it
            raise ValueError(f"the chat template failed on this conversation ({type(e).__name__}: {e})") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def check(self, params: SamplingParams) -> None:
        """Raise what the engine would raise on `params` when the request is added (vLLM's own
        checks, a structured output's grammar compiled by its backend included)."""
        assert self.llm is not None, "engine not started"
        p = self.llm.input_processor
        params.verify(p.model_config, p.speculative_config, p.structured_outputs_config, p.tokenizer)

    async def prompt_logprobs(self, seq: list[int], request_id: str) -> list[float | None]:
        """Each token's logprob under the served model alone given the tokens before it (None for
        the first, and for a last token that leaves no room in the context)."""
        room = seq[: self.max_model_len - 1]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)
        out = None
        async for out in self.generate(room, params, request_id):
            pass
        assert out is not None and out.prompt_logprobs is not None
        got = [None if at is None else at[token].logprob for token, at in zip(room, out.prompt_logprobs)]
        return got + [None] * (len(seq) - len(room))

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        assert self.llm is not None, "engine not started"
        return self.llm.generate({"prompt_token_ids": prompt}, params, request_id)

    async def attach_guides(self) -> None:
        """Show the guide runtime in the worker the engine's requests (see worker.py)."""
        await self.rpc("alignd_attach")

    async def watch(self, on_death: Callable[[], None], every: float = 0.1) -> None:
        """Notice the engine's death within `every` seconds: wake every waiting call, then tell
        the server."""
        while self.alive:
            await asyncio.sleep(every)
        if self.llm is not None:  # not a shutdown: the engine died under us
            self.dead.set()
            on_death()

    async def rpc(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call `method` of the worker extension; EngineDeadError or TimeoutError, never a hang."""
        if not self.alive:
            raise EngineDeadError("the engine is not running")
        call = asyncio.ensure_future(self.llm.collective_rpc(method, args=args))
        dead = asyncio.ensure_future(self.dead.wait())
        try:
            done, _ = await asyncio.wait({call, dead}, timeout=timeout or self.settings.rpc_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
            if not call.done():
                call.cancel()
        if call in done:
            return call.result()[0]
        if dead in done:
            raise EngineDeadError("the engine stopped")
        raise TimeoutError(f"the engine worker did not answer {method} in {timeout or self.settings.rpc_timeout:g} s")

    async def finish(self, seqs: list[list[int]], names: list[str], request_id: str,
                     kind: str = "reward") -> dict[str, Any]:
        """Scores of finished sequences by the worker's guide models of `kind` ({"rewards",
        "failed"}, one entry per sequence) and the request's notes, in budgeted calls."""
        rewards: list[dict[str, float]] = []
        failed: list[dict[str, str]] = []
        for part in self.budgeted(seqs):
            got = await self.rpc("alignd_score", seqs[part], names, kind)
            rewards += got["rewards"]
            failed += got["failed"]
        return {"rewards": rewards, "failed": failed, "notes": await self.rpc("alignd_take_notes", request_id)}

    def budgeted(self, seqs: list[list[int]]) -> Iterator[slice]:
        """Consecutive runs of `seqs` of at most a step's guide budget in tokens (one sequence
        at least): the worker answers a call between steps, so no call may hold the engine longer
        than a guided step may."""
        start = 0
        while start < len(seqs):
            end, size = start, 0
            while end < len(seqs) and (end == start or size + len(seqs[end]) <= self.settings.guide_step_budget):
                size += len(seqs[end])
                end += 1
            yield slice(start, end)
            start = end

    async def stats(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The worker's guide statistics, or the last ones read if it does not answer quickly.
        One call at a time: a call that outlasts `timeout` (the worker answers between steps, and
        a step may take longer) is left running and read by a later one."""
        if self._stats_call is None and self.alive:
            self._stats_call = asyncio.ensure_future(self.llm.collective_rpc("alignd_stats"))
        call = self._stats_call
        if call is not None:
            await asyncio.wait({call}, timeout=timeout)
            if call.done():
                self._stats_call = None
                if not call.cancelled() and call.exception() is None:
                    self._stats = call.result()[0]
        return self._stats

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored
