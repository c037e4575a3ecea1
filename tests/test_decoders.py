"""The decoders' maths on plain tensors, without vLLM: each step function is driven by a greedy
loop over a tiny HF base model, with the real guide runtime over tiny HF guides, and compared
token for token with the straightforward implementations in tests/reference.py. Several rows
with different settings share each step, as in the engine.

Also the decoder table: the schema, the validation and the costs derive from it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignd.decoders import args, best_of_n, dera, transfer_q, vas
from alignd.decoders.base import Row
from alignd.decoders.cost import candidate_tokens, guide_tokens
from alignd.decoders.params import ASK, AlignmentParams, from_extra_args, to_extra_args
from alignd.decoders.table import DECODERS
from alignd.rewards.runtime import GuideRuntime
from alignd.rewards.specs import GuideConfig, Route
from tests import reference

PROMPTS = [[5, 40, 41, 42], [7, 8, 60, 61, 62, 63, 9], [100, 3]]
NEW = 6


@pytest.fixture(scope="module")
def hf(tiny):
    def lm(name):
        return AutoModelForCausalLM.from_pretrained(tiny[name], dtype=torch.float32).eval()

    def rm(name):
        return AutoModelForSequenceClassification.from_pretrained(tiny[name], dtype=torch.float32).eval()

    return {"base": lm("base"), "base2": lm("base2"), "rm_a": rm("rm_a"), "rm_b": rm("rm_b"),
            "rm_other": rm("rm_other"), "tok": AutoTokenizer.from_pretrained(tiny["base"]),
            "tok_other": AutoTokenizer.from_pretrained(tiny["rm_other"])}


@pytest.fixture(scope="module")
def guides(tiny):
    config = GuideConfig(
        model=str(tiny["base"]),
        rewards={"a": str(tiny["rm_a"]), "b": str(tiny["rm_b"]), "other": str(tiny["rm_other"]),
                 "vowels": "py:tests.rules:vowel_share"},
        values={"a": str(tiny["rm_a"]), "b": str(tiny["rm_b"])},
        reference=str(tiny["base2"]),
        baseline=str(tiny["base2"]),
    )
    return GuideRuntime(config, torch.device("cpu"), torch.float32, 256)


def decode(step, guides, base, params: list[AlignmentParams]) -> list[list[int]]:
    """Greedy decoding of PROMPTS[i] with params[i], every row in every step together; the
    rows' guide states are released at the end and must leave nothing behind."""
    rows = [Row(p, f"r{i}", list(PROMPTS[i]), []) for i, p in enumerate(params)]
    for _ in range(NEW):
        seqs = [row.tokens() for row in rows]
        with torch.no_grad():
            logits = torch.stack([base(torch.tensor([s])).logits[0, -1].float() for s in seqs])
        out = step(guides, rows, seqs, logits)
        for row, token in zip(rows, out.argmax(-1).tolist()):
            row.output.append(token)
    assert all(row.failure is None and row.skipped is None for row in rows)
    for row in rows:
        row.release()
    assert guides.stats()["guide_states"] == 0
    return [row.output for row in rows]


def scorer(hf, name):
    if name == "other":
        return reference.hf_reward(hf["rm_other"], hf["tok_other"], hf["tok"])
    if name == "vowels":
        from tests.rules import vowel_share

        return reference.text_reward(vowel_share, hf["tok"])
    return reference.hf_reward(hf[f"rm_{name}"])


def no_eos(hf) -> int:
    return -1  # the loops run NEW tokens whatever comes: eos handling is the engine's


def test_args_matches_the_papers_rule_row_by_row(guides, hf):
    params = [
        AlignmentParams(decoder="args", rewards={"a": 2.0}, top_k=5),
        AlignmentParams(decoder="args", rewards={"a": -1.0, "b": 3.0}, top_k=3),
        AlignmentParams(decoder="args", rewards={"other": 1.5, "vowels": 4.0}, top_k=4),
    ]
    got = decode(args.step, guides, hf["base"], params)
    for i, p in enumerate(params):
        rewards = [(scorer(hf, n), w) for n, w in p.rewards.items()]
        assert got[i] == reference.args_greedy(hf["base"], rewards, PROMPTS[i], p.top_k, NEW, no_eos(hf))


def test_args_recomputing_rows_match_cached_rows(guides, hf):
    cached = AlignmentParams(decoder="args", rewards={"a": 3.0, "b": -2.0}, top_k=6)
    recomputed = cached.model_copy(update={"reward_cache": False})
    got = decode(args.step, guides, hf["base"], [cached, recomputed, cached])
    assert got[0] == decode(args.step, guides, hf["base"], [recomputed])[0]
    rewards = [(scorer(hf, n), w) for n, w in cached.rewards.items()]
    assert got[1] == reference.args_greedy(hf["base"], rewards, PROMPTS[1], 6, NEW, no_eos(hf))


def test_vas_matches_the_papers_rule(guides, hf):
    params = [
        AlignmentParams(decoder="vas", values={"a": 8.0}, top_k=5),
        AlignmentParams(decoder="vas", values={"a": 2.0, "b": -6.0}, top_k=8),
        AlignmentParams(decoder="vas", values={"b": 0.0}, top_k=2),
    ]
    got = decode(vas.step, guides, hf["base"], params)
    for i, p in enumerate(params):
        values = [(scorer(hf, n), b) for n, b in p.values.items()]
        assert got[i] == reference.vas_greedy(hf["base"], values, PROMPTS[i], p.top_k, NEW, no_eos(hf))
    assert got[2] == reference.greedy(hf["base"], PROMPTS[2], NEW, no_eos(hf))  # beta 0 = plain


def test_dera_matches_the_papers_rule(guides, hf):
    lambdas = [0.0, 0.5, 2.0]
    params = [AlignmentParams(decoder="dera", **{"lambda": lam}) for lam in lambdas]
    got = decode(dera.step, guides, hf["base"], params)
    for i, lam in enumerate(lambdas):
        assert got[i] == reference.dera_greedy(hf["base"], hf["base2"], lam, PROMPTS[i], NEW, no_eos(hf))
    assert got[0] == reference.greedy(hf["base2"], PROMPTS[0], NEW, no_eos(hf))  # lambda 0 = the reference


def test_dera_keeps_masked_tokens_masked(guides, hf):
    row = Row(AlignmentParams(decoder="dera", **{"lambda": 3.0}), "r", list(PROMPTS[0]), [])
    logits = torch.randn(1, hf["base"].config.vocab_size)
    logits[0, :50] = float("-inf")
    out = dera.step(guides, [row], [row.tokens()], logits)
    row.release()
    assert torch.isneginf(out[0, :50]).all() and torch.isfinite(out[0, 50:]).all()


def test_transfer_q_matches_the_slow_rule(guides, hf):
    params = [
        AlignmentParams(decoder="transfer_q", rewards={"a": 2.0}, top_k=3, rollout_tokens=3),
        AlignmentParams(decoder="transfer_q", rewards={"a": 1.0, "b": -2.0}, top_k=2, rollout_tokens=5),
    ]
    got = decode(transfer_q.step, guides, hf["base"], params)
    for i, p in enumerate(params):
        rewards = [(scorer(hf, n), w) for n, w in p.rewards.items()]
        want = reference.transfer_q_greedy(hf["base"], hf["base2"], rewards, PROMPTS[i], p.top_k,
                                           p.rollout_tokens, NEW, guides.eos)
        assert got[i][: len(want)] == want  # the reference stops at eos; the loop here does not


def test_a_failing_text_reward_marks_only_its_rows(guides, hf, monkeypatch):
    """A scorer that fails for one row: that row is marked failed, the others are scored."""
    text = guides.scorer("reward", "vowels")
    real = text.process

    def fail_second(texts):
        results = real(texts)
        return [results[0], "boom", *results[2:]]

    monkeypatch.setattr(text, "process", fail_second)
    rows = [Row(AlignmentParams(decoder="args", rewards={"vowels": 1.0}, top_k=3), f"r{i}", list(p), [])
            for i, p in enumerate(PROMPTS)]
    seqs = [row.tokens() for row in rows]
    logits = torch.randn(len(rows), hf["base"].config.vocab_size)
    out = args.step(guides, rows, seqs, logits)
    assert [row.failure is not None for row in rows] == [False, True, False]
    assert rows[1].failure == ("reward 'vowels'", "boom")
    assert torch.isnan(out[1]).any() and not torch.isnan(out[0]).any() and not torch.isnan(out[2]).any()


def test_best_of_n_picks_the_highest_total():
    assert best_of_n.pick([0.5, 2.0, None, 1.0]) == 1
    assert best_of_n.pick([None, -3.0]) == 1
    assert best_of_n.pick([None, None]) is None


# -- the table ------------------------------------------------------------------------------------
def test_the_schema_accepts_exactly_the_tables_decoders():
    names = AlignmentParams.model_json_schema()["properties"]["decoder"]["enum"]
    assert names == list(DECODERS)
    with pytest.raises(ValueError, match="decoder"):
        AlignmentParams(decoder="nope", rewards={"a": 1.0})


@pytest.mark.parametrize("name", list(DECODERS))
def test_each_decoder_asks_for_what_it_needs(name):
    needs = DECODERS[name].needs & ASK.keys()
    for need in needs:
        others = {field: {"x": 1.0} for field in needs - {need}}
        with pytest.raises(ValueError, match=f"{name} needs at least one"):
            AlignmentParams(decoder=name, **others)
    ok = AlignmentParams(decoder=name, **{field: {"x": 1.0} for field in needs})
    assert ok.method is DECODERS[name]
    assert DECODERS[name].step is not None or DECODERS[name].rank is not None  # in the engine, per request, or both
    assert ok.in_engine == (DECODERS[name].rank is None)  # a ranking decoder enters the engine only to prune


def test_only_in_engine_decoders_travel_to_the_engine():
    for name, decoder in DECODERS.items():
        al = AlignmentParams(decoder=name, **{need: {"x": 1.0} for need in decoder.needs & ASK.keys()})
        if not al.in_engine:
            with pytest.raises(ValueError, match="does not run inside the engine"):
                from_extra_args(to_extra_args(al, "id"))
        else:
            guided = from_extra_args(to_extra_args(al, "id"))
            assert guided is not None and guided.alignment == al and guided.request_id == "id"
    pruned = AlignmentParams(decoder="best_of_n", rewards={"x": 1.0}, prune={"every": 4, "keep": 0.5})
    guided = from_extra_args(to_extra_args(pruned, "id", sample="id-0-s3"))
    assert guided.alignment == pruned and guided.sample == "id-0-s3"
    assert from_extra_args(None) is None and from_extra_args({"other": 1}) is None


def test_costs_follow_what_each_decoder_runs():
    routes = {("reward", "text"): Route.text, ("reward", "slow"): Route.retokenized}
    args_ = AlignmentParams(decoder="args", rewards={"a": 1, "text": 1, "slow": 1}, top_k=4)
    assert guide_tokens(args_, routes, 100) == 4 + 4 + 4 * 101  # cached, text, recomputed
    tq = AlignmentParams(decoder="transfer_q", rewards={"a": 1}, top_k=3, rollout_tokens=5)
    assert guide_tokens(tq, routes, 100) == 3 * 6 + 3 * 5 and candidate_tokens(tq) == 18
    v = AlignmentParams(decoder="vas", values={"a": 1, "b": 1}, top_k=5)
    assert guide_tokens(v, routes, 100) == 10 and candidate_tokens(v) == 5
    d = AlignmentParams(decoder="dera")
    assert guide_tokens(d, routes, 100) == 1 and candidate_tokens(d) == 1
    # Pruning best-of-n reads the one token each sample just made, whatever top_k's default.
    bon = AlignmentParams(decoder="best_of_n", rewards={"a": 1, "slow": 1}, prune={"every": 4, "keep": 0.5})
    assert guide_tokens(bon, routes, 100) == 1 + 101 and candidate_tokens(bon) == 1


@pytest.mark.parametrize("name", list(DECODERS))
def test_a_field_the_decoder_does_not_read_is_refused(name):
    decoder = DECODERS[name]
    needs = {need: {"x": 1.0} for need in decoder.needs & ASK.keys()}
    fields = {"rewards": {"x": 1.0}, "values": {"x": 1.0}, "top_k": 3, "rollout_tokens": 2, "lambda": 0.5, "n": 2,
              "return_candidates": True, "reward_cache": False, "prune": {"every": 4, "keep": 0.5},
              "block_tokens": 4}
    assert set(fields) | {"decoder"} == {f.alias or n for n, f in AlignmentParams.model_fields.items()}
    for field, value in fields.items():
        if field in decoder.params:
            AlignmentParams(decoder=name, **{**needs, field: value})
        else:
            with pytest.raises(ValueError, match=f"{name} does not use '{field}'"):
                AlignmentParams(decoder=name, **{**needs, field: value})
    # What travels to the engine is what the request set: it validates there again.
    if decoder.rank is None:
        al = AlignmentParams(decoder=name, **needs)
        assert from_extra_args(to_extra_args(al, "id")).alignment.given() == al.given()


def test_decoders_and_guides_import_without_vllm():
    code = ("import sys, alignd.decoders.table, alignd.decoders.cost, alignd.rewards.runtime; "
            "print(any(m.split('.')[0] == 'vllm' for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
