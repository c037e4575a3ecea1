"""The pieces of `alignd models build` on the tiny models: fitting reward models on a base
model's layers, the saved folder's route and scores, DPO, the build's steps and serve.yaml.

The real build (SmolLM2, real labellers, about half an hour on two CPU cores) is not run here.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from alignd.rewards.guide_model import GuideModel
from alignd.rewards.specs import Route, check_lm, classify
from alignd.training import build, reward_model, steps
from alignd.training.stats import pearson, spearman

PAD = 3  # the tiny tokenizer's <pad>


def random_seqs(n: int, vocab: int, seed: int, lo: int = 6, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(7, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def all_positions(seqs):
    return [list(range(len(s))) for s in seqs]


def test_cut_positions_skip_padding_and_keep_the_end():
    rng = random.Random(0)
    ids = [5, 9, PAD, 11, 12, PAD, 13, PAD]
    for _ in range(20):
        cuts = reward_model.cut_positions(ids, 1, 3, rng, PAD)
        assert cuts == sorted(set(cuts)) and cuts[-1] == 6
        assert all(ids[t] != PAD and t >= 1 for t in cuts) and len(cuts) <= 4
    assert reward_model.cut_positions([PAD, PAD], 0, 3, rng, PAD) == []


def test_probe_recovers_a_linear_target(tiny):
    """Soft labels made by a known head on the tiny model's own states: the fitted head
    reproduces them (up to the penalty)."""
    backbone = reward_model.load_backbone(tiny["base"], 2, torch.float32)
    seqs = random_seqs(60, backbone.config.vocab_size, 0)
    x = reward_model.hidden_features(backbone, seqs, all_positions(seqs), (1, 2), PAD, tokens_per_batch=256)
    assert x[1].shape == x[2].shape == (sum(map(len, seqs)), backbone.config.hidden_size)
    # the last layer's feature is transformers' own last_hidden_state
    with torch.no_grad():
        ref = backbone(input_ids=torch.tensor([seqs[0]])).last_hidden_state[0]
    torch.testing.assert_close(x[2][: len(seqs[0])], ref, rtol=1e-4, atol=1e-4)
    truth = torch.randn(x[2].shape[1], generator=torch.Generator().manual_seed(1)) * 0.3
    p = torch.sigmoid(x[2] @ truth)
    w = reward_model.fit_logistic(x[2], p, 1e-7)
    assert pearson(x[2] @ w.float(), x[2] @ truth) > 0.99
    assert reward_model.log_loss(x[2] @ w.float(), p) < reward_model.log_loss(torch.zeros(len(p)), p)


@pytest.fixture(scope="module")
def fitted(tiny, tmp_path_factory):
    """A reward model fitted on the tiny base (1 frozen layer + 1 fine-tuned) to a teacher: the
    same shape of model with perturbed weights and a random head, whose sigmoid is the label.
    (A random tiny model's states carry little a linear probe can read; the teacher's labels
    are reachable by fine-tuning.)"""
    base = tiny["base"]
    seqs = random_seqs(160, AutoTokenizer.from_pretrained(base).vocab_size, 2)
    positions = [reward_model.cut_positions(s, 2, 6, random.Random(i), PAD) for i, s in enumerate(seqs)]
    states = reward_model.residual_states(reward_model.load_backbone(base, 1, torch.float32), seqs, PAD, 512)
    teacher = reward_model.top_model(base, 1, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if "norm" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        teacher.score.weight.copy_(torch.randn(teacher.score.weight.shape, generator=g) * 0.3)
    with torch.inference_mode():
        targets = [torch.sigmoid(reward_model.top_scores(teacher, states, positions, [i])).float()
                   for i in range(len(seqs))]
    top = reward_model.top_model(base, 1, 2)
    train, held = list(range(120)), list(range(120, 160))
    w = reward_model.fit_logistic(reward_model.top_features(top, states, positions, train),
                                torch.cat([targets[i] for i in train]), 1e-5)
    with torch.no_grad():
        top.score.weight.copy_(w.float()[None])

    def held_spearman():
        with torch.inference_mode():
            got = torch.cat([reward_model.top_scores(top, states, positions, [i]) for i in held])
        return spearman(got, torch.cat([targets[i] for i in held]))

    probe = held_spearman()
    losses = reward_model.train_top(top, states, positions, targets, train, epochs=10, lr=1e-3, seed=0,
                                  tokens_per_batch=512)
    out = tmp_path_factory.mktemp("rm")
    reward_model.assemble(base, 1, top, out, {"scale": "log-odds"})
    return {"out": out, "seqs": seqs, "positions": positions, "losses": losses, "probe": probe,
            "tuned": held_spearman(), "top": top, "states": states}


def test_fine_tuning_lowers_the_loss_and_generalizes(fitted):
    # measured: loss 0.50 -> 0.34, held-out Spearman 0.685 (probe) -> 0.727
    assert fitted["losses"][-1] < 0.8 * fitted["losses"][0]
    assert fitted["tuned"] > fitted["probe"] + 0.01 and fitted["tuned"] > 0.6


def test_saved_reward_model_takes_the_cached_path_and_scores_prefixes_like_transformers(tiny, fitted):
    out, seqs, positions = fitted["out"], fitted["seqs"][:6], fitted["positions"][:6]
    base_tok = AutoTokenizer.from_pretrained(tiny["base"])
    assert classify(str(out), base_tok, "reward") is Route.cached
    model = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 1
    assert model.config.pad_token_id == base_tok.pad_token_id
    prefixes = [s[: t + 1] for s, pos in zip(seqs, positions) for t in pos]
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([p])).logits[0, 0] for p in prefixes])
    # the build's own float32 scoring (one forward per text, read at every cut) ...
    torch.testing.assert_close(reward_model.model_scores(out, seqs, positions), want, rtol=1e-4, atol=1e-4)
    # ... alignd's guide runtime (the served computation) ...
    guide = GuideModel(model, "score", max_len=64)
    torch.testing.assert_close(guide.score_sequences(prefixes), want, rtol=1e-4, atol=1e-4)
    # ... and the bf16-autocast training forward it was fitted with
    with torch.inference_mode():
        trained = torch.cat([reward_model.top_scores(fitted["top"], fitted["states"], fitted["positions"], [i])
                             for i in range(6)])
    assert pearson(trained, want) > 0.99
    # a text ending in padding (EOS) is scored as the text before it
    with torch.no_grad():
        padded = model(torch.tensor([prefixes[0] + [PAD]])).logits[0, 0]
    torch.testing.assert_close(padded, want[0], rtol=1e-4, atol=1e-4)


def test_dpo_raises_the_chosen_over_rejected_margin(tiny, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from alignd.training import dpo

    monkeypatch.setitem(dpo.DPO, "epochs", 4)
    monkeypatch.setitem(dpo.DPO, "batch_size", 4)
    monkeypatch.setitem(dpo.DPO, "learning_rate", 2e-3)
    base = tiny["base"]
    tok = AutoTokenizer.from_pretrained(base)
    words = ["the movie was great and wonderful", "the film was terrible and boring",
             "a lovely day in the park", "the food was cold and slow"]
    pairs = [{"prompt": [{"role": "user", "content": f"review {i} ."}],
              "chosen": [{"role": "assistant", "content": words[i % 2 * 2]}],
              "rejected": [{"role": "assistant", "content": words[i % 2 * 2 + 1]}]} for i in range(8)]
    model, history = dpo.train_dpo(base, pairs, tmp_path / "work", seed=0)
    assert any("loss" in h for h in history)
    out = tmp_path / "aligned"
    model.save_pretrained(out)
    tok.save_pretrained(out)

    def margin(m) -> float:
        total = 0.0
        for p in pairs[:2]:
            prompt = tok.apply_chat_template(p["prompt"], add_generation_prompt=True, tokenize=False)
            lp = []
            for key in ("chosen", "rejected"):
                ids = tok(prompt + p[key][0]["content"], add_special_tokens=False)["input_ids"]
                n = len(tok(prompt, add_special_tokens=False)["input_ids"])
                with torch.no_grad():
                    logp = torch.log_softmax(m(torch.tensor([ids])).logits[0, n - 1 : -1], -1)
                lp.append(logp.gather(1, torch.tensor(ids[n:])[:, None]).sum().item())
            total += lp[0] - lp[1]
        return total

    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    aligned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert aligned.dtype == torch.float32
    assert margin(aligned) > margin(reference) + 1.0
    # usable as DeRa's pair: same vocabulary, cached path
    check_lm(str(base), tok, aligned.config.vocab_size, "reference")
    check_lm(str(out), tok, reference.config.vocab_size, "reference")


def test_a_step_is_built_atomically_and_skipped_once_built(tmp_path):
    times = {}

    def broken(out: Path):
        (out / "half.bin").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        steps.step(tmp_path, "thing", broken, times)
    assert not (tmp_path / "thing").exists() and not list(tmp_path.glob(".thing.*"))
    calls = []
    steps.step(tmp_path, "thing", lambda out: (out / "done.txt").write_text("ok") and calls.append(1), times)
    assert (tmp_path / "thing" / "done.txt").read_text() == "ok" and "thing" in times
    steps.step(tmp_path, "thing", lambda out: calls.append(2), times)
    assert calls == [1]


def test_steps_made_together_build_only_the_missing_ones_and_publish_all_or_none(tmp_path):
    """The two reward models share their frozen pass: made in one call, only those missing, and
    an interrupted call leaves neither half made."""
    times = {}
    (tmp_path / "a").mkdir()

    def broken(outs: dict[str, Path]):
        for out in outs.values():
            (out / "half.bin").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        steps.steps(tmp_path, ["a", "b", "c"], broken, times)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    seen = []

    def make(outs: dict[str, Path]):
        seen.append(sorted(outs))
        for name, out in outs.items():
            (out / "name.txt").write_text(name)

    finals = steps.steps(tmp_path, ["a", "b", "c"], make, times)
    assert seen == [["b", "c"]] and "b+c" in times
    assert [(finals[n] / "name.txt").read_text() for n in "bc"] == ["b", "c"] and finals["a"] == tmp_path / "a"
    steps.steps(tmp_path, ["a", "b", "c"], make, times)
    assert len(seen) == 1


def test_serve_config_serves_the_aligned_model_with_the_base_as_reference(tmp_path):
    base = tmp_path / "smollm2"
    models = {name: tmp_path / name for name in (build.RM_SENTIMENT, build.RM_NONTOXIC, build.ALIGNED, build.VALUE)}
    config, _, _ = build.serve_config(base, models)
    assert config["model"] == str(models[build.ALIGNED]) and config["reference"] == str(base)
    assert config["rewards"] == {"sentiment": str(models[build.RM_SENTIMENT]),
                                 "nontoxic": str(models[build.RM_NONTOXIC]),
                                 "sentiment_spacy": "py:alignd.rewards.text_rewards:sentiment",
                                 "nontoxic_svm": "py:alignd.rewards.text_rewards:nontoxic"}
    assert config["values"] == {"sentiment": str(models[build.VALUE])}
    assert config["dtype"] == "float32" and config["max_model_len"] == 2048
    # Without a GPU, a step budget sized for CPU cores (the default suits a GPU).
    assert config.get("guide_step_budget") == (None if build.gpu_host() else 96)
    bare, _, _ = build.serve_config(base, {})
    assert bare["model"] == str(base) and "reference" not in bare and "values" not in bare
    assert bare["rewards"] == {"sentiment": "py:alignd.rewards.text_rewards:sentiment",
                               "nontoxic": "py:alignd.rewards.text_rewards:nontoxic"}


def test_serve_yaml_is_rewritten_unless_edited_by_hand(tmp_path):
    base = tmp_path / "smollm2"
    path = tmp_path / "serve.yaml"
    legacy = {"model": str(base), **build.LEGACY_CONFIG}
    path.write_text(yaml.safe_dump(legacy))
    models = {build.RM_SENTIMENT: tmp_path / "rm"}
    build.write_config(tmp_path, base, models)  # an old build's config: replaced
    assert yaml.safe_load(path.read_text())["rewards"]["sentiment"] == str(tmp_path / "rm")
    build.write_config(tmp_path, base, {})  # our own: rewritten for what exists now
    assert yaml.safe_load(path.read_text())["rewards"]["sentiment"].startswith("py:")
    path.write_text("model: /somewhere/else\n")  # edited by hand: kept
    build.write_config(tmp_path, base, models)
    assert path.read_text() == "model: /somewhere/else\n"


def test_demo_data_splits_by_source():
    pytest.importorskip("spacy")
    from alignd.training import demo_data as d

    reviews, rtp = d.imdb_reviews(), d.rtp_prompts()
    assert len(reviews) == 200 and {r["label"] for r in reviews} == {0, 1}
    assert len(rtp) == 993 and all(0.5 <= r["toxicity"] <= 1 for r in rtp)
    held = d.heldout_ids(len(reviews))
    assert len(held) == 40 and held == d.heldout_ids(len(reviews))
    prompt = d.sentiment_prompt(reviews[0])
    assert prompt != d.sentiment_prompt(reviews[1]) and "<br" not in prompt


def test_value_step_runs_train_value_and_publishes_a_value_folder(tiny, tmp_path, monkeypatch):
    pytest.importorskip("spacy")
    monkeypatch.setattr(build, "VALUE_PROMPTS", 4)
    monkeypatch.setattr(build, "VALUE_TRAINING", {**build.VALUE_TRAINING, "samples_per_prompt": 2, "max_tokens": 6,
                                                  "epochs": 1, "backbone_layers": 1})
    times = {}
    out = build.make_value(tmp_path, tiny["base"], tiny["base"], tiny["rm_a"], times)
    assert out == tmp_path / build.VALUE and build.VALUE in times
    assert not (out / "checkpoint").exists() and not list(tmp_path.glob(".value-sentiment*"))
    assert classify(str(out), AutoTokenizer.from_pretrained(tiny["base"]), "value") is Route.cached
    card = (out / "README.md").read_text()
    assert "alignd models build" in card and ".work" not in card
    assert len((out / "prompts.jsonl").read_text().splitlines()) == 4
    calls = []
    monkeypatch.setattr(build.shutil, "rmtree", lambda *a, **k: calls.append(a))
    assert build.make_value(tmp_path, tiny["base"], tiny["base"], tiny["rm_a"], times) == out and not calls
