"""Methods added to vLLM's worker (`worker_extension_cls`), called from the server through
`collective_rpc`: they reach the guide models that live in the worker, so best-of-n and the
rewards reported with each response use the very same loaded models."""

from __future__ import annotations

from alignd.rewards.runtime import GuideRuntime


class GuideWorkerExtension:
    def alignd_attach(self) -> None:
        """Let the guide runtime see the engine's live requests: the processor keeps the guide
        caches of a request the scheduler holds out of a step, and frees them once it ends."""
        GuideRuntime.current().runner = self.model_runner

    def alignd_score(self, seqs: list[list[int]], names: list[str], kind: str = "reward") -> dict:
        rewards, failed = GuideRuntime.current().score(seqs, names, kind)
        return {"rewards": rewards, "failed": failed}

    def alignd_checkpoints(self, request_id: str, samples: list[str], at: int) -> list[float | None]:
        """The weighted reward of each sample's first `at` tokens, None where none was kept."""
        return GuideRuntime.current().checkpoint_totals(request_id, samples, at)

    def alignd_score_blocks(self, key: str, seq: list[int], blocks: list[list[int]], names: list[str]) -> dict:
        rewards, failed = GuideRuntime.current().score_blocks(key, seq, blocks, names)
        return {"rewards": rewards, "failed": failed}

    def alignd_end_search(self, key: str) -> None:
        GuideRuntime.current().end_search(key)

    def alignd_take_notes(self, request_id: str) -> list[str]:
        return GuideRuntime.current().take_notes(request_id)

    def alignd_stats(self) -> dict:
        return GuideRuntime.current().stats()
