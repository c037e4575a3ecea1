"""Tensor parallelism on vLLM's CPU engine: two ranks, one core each, each with its own copy of
the guide models, must decide exactly as one rank does."""

from __future__ import annotations

import os

import pytest

from tests.conftest import start_server

PROMPTS = ["the long road", "a quiet evening by the sea", "we went to the market and"]
ARGS = {"decoder": "args", "rewards": {"a": 2.0, "b": -1.0}, "top_k": 8}


@pytest.fixture(scope="module")
def tp2_server(tiny, tmp_path_factory):
    config = {"model": str(tiny["base"]), "served_model_name": "tiny", "dtype": "float32", "max_model_len": 256,
              "tensor_parallel_size": 2, "rewards": {"a": str(tiny["rm_a"]), "b": str(tiny["rm_b"])}}
    # One core per rank (the CPU build binds each rank's OpenMP threads to its own cores).
    bind = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1")}
    yield from start_server(config, tmp_path_factory.mktemp("tp2"), env=bind)


def _greedy(server, alignment: dict | None) -> list[tuple[list[int], float | None]]:
    out = []
    for prompt in PROMPTS:
        extra = {"return_token_ids": True, "ignore_eos": True, **({"alignment": alignment} if alignment else {})}
        c = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=32, temperature=0,
                                               extra_body=extra).choices[0]
        out.append((c.model_extra["token_ids"], (c.model_extra.get("alignment") or {}).get("total")))
    return out


def test_args_greedy_under_tp2_equals_tp1(server, tp2_server):
    one, two = _greedy(server, ARGS), _greedy(tp2_server, ARGS)
    assert [ids for ids, _ in two] == [ids for ids, _ in one]
    assert [total for _, total in two] == [total for _, total in one]  # rank 0's final scoring
    # The guidance is at work: plain greedy decoding takes other tokens.
    assert [ids for ids, _ in _greedy(tp2_server, None)] != [ids for ids, _ in two]
