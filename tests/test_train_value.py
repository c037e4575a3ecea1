"""`alignd train-value` end to end on the tiny models: sample the base, score, fit V by TD(lambda),
save a folder `--value` loads, and resume from the caches.

The reward is the text rule `vowel_share` of prompt + completion: a 2-layer value model can learn
it from prefixes (it is an average over the tokens read so far), unlike a random reward model.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from scipy.stats import pearsonr
import torch

from alignd.training import value_fit
from alignd.server.cli import main
from tests.tiny_models import CORPUS

REWARD = "vowels=py:tests.rules:vowel_share"
PROMPTS = 200
EPOCHS = 3
# Measured with these settings (seeds 0, 1, 2): held-out Pearson of V(whole sequence) with R
# 0.671, 0.675, 0.649; Spearman 0.653, 0.667, 0.634; V(prompt end) Pearson 0.374, 0.423, 0.271.
MIN_CORRELATION = 0.45


def write_prompts(path: Path, n: int) -> Path:
    words = " ".join(CORPUS).split()
    rng = random.Random(0)
    path.write_text("".join(" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))) + "\n" for _ in range(n)))
    return path


def argv(tiny, prompts: Path, out: Path, *extra: str) -> list[str]:
    return ["train-value", "--model", str(tiny["base"]), "--reward", REWARD, "--prompts", str(prompts),
            "--out", str(out), "--samples-per-prompt", "4", "--max-tokens", "24", "--lr", "1e-3",
            "--seed", "0", "--sampler", "hf", "--device", "cpu", *extra]


def log_since(out: Path, offset: int) -> str:
    return (out / "train.log").read_text()[offset:]


def copy_caches(src: Path, dst: Path, names=("run.json", "samples.jsonl", "rewards.jsonl")) -> None:
    dst.mkdir(parents=True)
    for name in names:
        shutil.copy(src / name, dst / name)


def rewards_of(out: Path) -> list[float]:
    return [r["rewards"]["vowels"] for r in map(json.loads, (out / "rewards.jsonl").read_text().splitlines())]


def samples_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The machine is shared: two OpenMP threads spin-wait for a busy core and run many times
    # slower; one thread is fast enough for these models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("train_value")
    prompts = write_prompts(work / "prompts.txt", PROMPTS)
    out = work / "value"
    assert main(argv(tiny, prompts, out, "--epochs", str(EPOCHS))) == 0
    return out, prompts


def test_td_lambda_targets_follow_the_recursion():
    lam = 0.95
    values = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, -0.5, 9.0, 9.0]])
    rewards = torch.tensor([1.0, 2.0])
    states = torch.tensor([4, 2])  # the second row has two states; its later columns are padding
    got = value_fit.td_lambda_targets(values, rewards, states, lam)
    g3 = 1.0
    g2 = (1 - lam) * 0.4 + lam * g3
    g1 = (1 - lam) * 0.3 + lam * g2
    g0 = (1 - lam) * 0.2 + lam * g1
    assert torch.allclose(got[0], torch.tensor([g0, g1, g2, g3]))
    assert torch.allclose(got[1, :2], torch.tensor([(1 - lam) * -0.5 + lam * 2.0, 2.0]))
    # lambda = 1: Monte Carlo (every state's target is R); lambda = 0: one-step TD.
    assert torch.equal(value_fit.td_lambda_targets(values, rewards, states, 1.0)[0], torch.ones(4))
    assert torch.allclose(value_fit.td_lambda_targets(values, rewards, states, 0.0)[0],
                          torch.tensor([0.2, 0.3, 0.4, 1.0]))


def test_value_correlates_with_the_reward_on_held_out_prompts(trained):
    from transformers import AutoModelForSequenceClassification

    out, _ = trained
    metrics = json.loads((out / "metrics.json").read_text())
    held = metrics["holdout"]
    assert held["n"] == metrics["holdout_samples"] > 100
    assert held["pearson_final"] > MIN_CORRELATION, held
    assert held["spearman_final"] > MIN_CORRELATION, held
    # V reads the completion, not just the prompt: the whole-sequence value is the better one.
    assert held["pearson_final"] > held["pearson_prompt"] + 0.1, held
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in log] == list(range(EPOCHS + 1))

    # The same number, recomputed independently: plain transformers on the saved folder.
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = set(metrics["holdout_prompt_ids"])
    samples, rewards = samples_of(out), rewards_of(out)
    test = [i for i, s in enumerate(samples) if s["prompt"] in ids]
    with torch.no_grad():
        v = torch.stack([model(torch.tensor([samples[i]["prompt_ids"] + samples[i]["completion_ids"]])).logits[0, 0]
                         for i in test])
    r = torch.tensor([rewards[i] for i in test])
    assert pearsonr(v.double().numpy(), r.double().numpy()).statistic == pytest.approx(held["pearson_final"], abs=1e-4)


def test_training_values_are_what_the_guide_runtime_computes(trained):
    """V(s_t) as trained (one forward, pooled per prefix) equals alignd's guide runtime on each
    prefix, including prefixes that end in a pad token."""
    from transformers import AutoModelForSequenceClassification

    from alignd.rewards.guide_model import GuideModel

    out, _ = trained
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    pad = model.config.pad_token_id
    samples = samples_of(out)[:3]
    seqs = [s["prompt_ids"] + s["completion_ids"] for s in samples]
    seqs[0] = seqs[0][:-3] + [pad] + seqs[0][-2:]  # a pad inside: pooled at the token before it
    lens = [len(s["prompt_ids"]) for s in samples]
    with torch.no_grad():
        v, states = value_fit.state_values(model, seqs, lens, pad, torch.device("cpu"))
    guide = GuideModel(model, "score", 256)
    for row, (seq, p) in enumerate(zip(seqs, lens)):
        prefixes = [seq[: p + j] for j in range(int(states[row]))]
        assert torch.allclose(v[row, : len(prefixes)], guide.score_sequences(prefixes), atol=1e-5)


def test_folder_is_a_cached_value_model(tiny, trained):
    from transformers import AutoConfig, AutoTokenizer

    from alignd.rewards.specs import Route, classify

    out, _ = trained
    base_tokenizer = AutoTokenizer.from_pretrained(tiny["base"])
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.architectures == ["LlamaForSequenceClassification"]
    assert cfg.num_labels == 1 and cfg.pad_token_id == base_tokenizer.pad_token_id
    assert cfg.alignd_value["rewards"] == {"vowels": "py:tests.rules:vowel_share"}
    assert classify(str(out), base_tokenizer, "value") is Route.cached
    card = (out / "README.md").read_text()
    assert "alignd serve" in card and "lambda = 0.95" in card and "train-value" in card


def test_rerun_resumes_from_the_caches_and_the_checkpoint(tiny, trained, tmp_path):
    from transformers import AutoModelForSequenceClassification

    src, prompts = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(src, resumed)
    before = (resumed / "samples.jsonl").read_bytes()
    offset = len((resumed / "train.log").read_text())
    assert main(argv(tiny, prompts, resumed, "--epochs", str(EPOCHS + 1))) == 0
    log = log_since(resumed, offset)
    assert "sampling skipped" in log and "scoring skipped" in log
    assert f"resumed from {resumed / 'checkpoint'} after epoch {EPOCHS}" in log
    assert f"epoch {EPOCHS}:" not in log and f"epoch {EPOCHS + 1}:" in log  # only the new epoch ran
    assert (resumed / "samples.jsonl").read_bytes() == before

    # Seeded: an uninterrupted run on the same samples ends with the same model.
    straight = tmp_path / "straight"
    copy_caches(src, straight)
    assert main(argv(tiny, prompts, straight, "--epochs", str(EPOCHS + 1))) == 0
    a = AutoModelForSequenceClassification.from_pretrained(resumed).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(straight).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_interrupted_sampling_resumes_with_the_same_samples(tiny, trained, tmp_path):
    src, prompts = trained
    out = tmp_path / "partial"
    copy_caches(src, out, ("run.json",))
    lines = (src / "samples.jsonl").read_text().splitlines(keepends=True)
    # Half the prompts, one of them with only some of its samples, and a half-written line.
    (out / "samples.jsonl").write_text("".join(lines[: PROMPTS * 2 + 2]) + lines[PROMPTS * 2 + 2][:20])
    assert main(argv(tiny, prompts, out, "--epochs", "1")) == 0
    assert f"prompts {PROMPTS // 2}..{PROMPTS - 1}" in (out / "train.log").read_text()
    assert (out / "samples.jsonl").read_text() == "".join(lines)


def test_backbone_choices(tiny, trained, tmp_path):
    from transformers import AutoConfig

    src, prompts = trained
    out = tmp_path / "small"
    copy_caches(src, out)
    # A reward model as the backbone (a classifier of another size), cut to its first layer.
    assert main(argv(tiny, prompts, out, "--epochs", "1", "--backbone", str(tiny["rm_a"]),
                     "--backbone-layers", "1")) == 0
    cfg = AutoConfig.from_pretrained(out)
    assert cfg.num_hidden_layers == 1 and cfg.hidden_size == 96
    assert json.loads((out / "metrics.json").read_text())["route"] == "cached"

    bad = tmp_path / "bad"
    copy_caches(src, bad)
    assert main(argv(tiny, prompts, bad, "--backbone", str(tiny["rm_other"]))) == 2
    assert "vocabulary differs from the base model's" in (bad / "train.log").read_text()
    assert main(argv(tiny, prompts, bad, "--backbone-layers", "7")) == 2
    assert main(argv(tiny, prompts, bad, "--reward-weight", "nope=2")) == 2
    assert not (bad / "config.json").exists()
