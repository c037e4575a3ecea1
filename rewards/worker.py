"""Methods added to vLLM's worker (`worker_extension_cls`), called from the server through
`collective_rpc`: they reach the guide models that live in the worker, so best-of-n and the
rewards reported with each response use the very same loaded models."""

from __future__ import annotations

from alignd.rewards.runtime import GuideRuntime


class GuideWorkerExtension:
    def alignd_finish(self, seqs: list[list[int]], names: list[str], request_id: str) -> dict:
        guides = GuideRuntime.current()
        return {"rewards": guides.score(seqs, names), "notes": guides.take_notes(request_id)}

    def alignd_stats(self) -> dict[str, float]:
        return GuideRuntime.current().stats()
