"""Sampling a model folder with vLLM's offline engine, for the model factory (demo samples, the
DPO evaluation, value training): batched with a paged KV cache, many times faster than
transformers `generate` on a CPU, and reproducible through one seed per prompt.

It runs in a spawned child process: vLLM changes the process it runs in (environment,
LD_PRELOAD, NUMA memory binding on CPU) and frees GPU memory only on exit, while the caller goes
on training in its own. A script that calls it needs an `if __name__ == "__main__":` guard (the
alignd CLI has one).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from alignd.rewards.specs import GuideError

CHUNK = 256  # prompts per engine call: an interrupted run loses at most one chunk


@dataclass
class Job:
    """`n` completions of each prompt from `start` on: plain temperature sampling (no top-k /
    top-p), greedy at temperature 0; prompt i draws with seeds[i]."""

    prompts: list[list[int]]
    seeds: list[int]
    n: int
    temperature: float
    max_tokens: int
    start: int = 0


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows as JSON lines, synced: a killed run keeps all it wrote but a partial last line."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def prompt_seed(seed: int, index: int) -> int:
    # One seed per prompt: a prompt's samples do not depend on batching or on where a run stopped.
    return (seed * 1_000_003 + index) % (2**31 - 1)


def sample(model: str, jobs: list[Job], out: Path, dtype: str = "float32", desc: str = "sampling") -> None:
    """Run the jobs on one engine, appending one JSON line per completion to `out`: {"job": k,
    "prompt": i, "sample": j, "prompt_ids", "completion_ids"} (a completion ends with the EOS
    token when the model stopped)."""
    proc = multiprocessing.get_context("spawn").Process(
        target=_sample_in_child, args=(str(model), [asdict(j) for j in jobs], str(out), dtype, desc)
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise GuideError(f"sampling {model} with vLLM failed (exit status {proc.exitcode}); see its log above. "
                         "The samples written so far are kept")


def completions(model: str, jobs: list[Job], dtype: str = "float32", desc: str = "sampling") -> list[list[list[list[int]]]]:
    """The jobs' completions: by job, by prompt, in sample order."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        sample(model, jobs, path, dtype, desc)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    out = [[[] for _ in job.prompts] for job in jobs]
    for r in sorted(rows, key=lambda r: (r["job"], r["prompt"], r["sample"])):
        out[r["job"]][r["prompt"]].append(r["completion_ids"])
    return out


def _sample_in_child(model: str, jobs: list[dict], out: str, dtype: str, desc: str) -> None:
    from tqdm import tqdm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.platforms import current_platform

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB; only read by the CPU build
    # vLLM's CPU build pins its model to all cores but one (kept for its scheduler) and then to one
    # torch thread, the right choice for a server. For a batch job on a small machine, unpinned
    # torch threads on every core sample faster (SmolLM2, 256 sequences, two cores: 83 tokens/s
    # against 58). The CUDA build reads neither variable.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    longest = max(len(p) + job["max_tokens"] for job in jobs for p in job["prompts"])
    # The CPU build dies when a seeded prompt is prefilled over several steps (server/engine.py).
    # On CPU, torch.compile's warm-up takes minutes (more than a demo sample set's decoding) and
    # buys little for a 135M model: eager from the first step.
    # At most 256 sequences at once, so that their KV fits the 4 GiB cache (about 48K tokens of
    # SmolLM2): vLLM recomputes a preempted sequence from its start.
    cpu = {"enable_chunked_prefill": False, "max_num_batched_tokens": max(longest, 8192), "enforce_eager": True,
           "max_num_seqs": 256}
    llm = LLM(model=model, seed=0, dtype=dtype, max_model_len=longest, **(cpu if current_platform.is_cpu() else {}))
    try:
        for k, job in enumerate(jobs):
            prompts, seeds = job["prompts"], job["seeds"]
            with tqdm(total=len(prompts), initial=job["start"], desc=desc, unit="prompt") as bar:
                for lo in range(job["start"], len(prompts), CHUNK):
                    idx = list(range(lo, min(lo + CHUNK, len(prompts))))
                    params = [SamplingParams(n=job["n"], temperature=job["temperature"], top_p=1.0, top_k=0,
                                             max_tokens=job["max_tokens"], seed=seeds[i]) for i in idx]
                    outs = llm.generate([TokensPrompt(prompt_token_ids=prompts[i]) for i in idx], params,
                                        use_tqdm=False)
                    rows = [{"job": k, "prompt": i, "sample": j, "prompt_ids": prompts[i],
                             "completion_ids": list(c.token_ids)}
                            for i, o in zip(idx, outs) for j, c in enumerate(o.outputs)]
                    append_jsonl(Path(out), rows)
                    bar.update(len(idx))
    finally:
        # A multiprocessing child skips atexit, where vLLM stops its engine process: without
        # this the child waits for that process forever.
        llm.llm_engine.engine_core.shutdown()
