"""Start-up: settings merge, and every bad model reported in one clear line before any engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer, LlamaForSequenceClassification

from alignd.server.config import load_settings

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alignd.server.cli", "serve", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_flags_override_yaml(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "port": 9000, "rewards": {"a": "x", "b": "y"}, "dtype": "float32"}))
    s = load_settings(cfg, {"port": 9100, "rewards": {"b": "z"}, "dtype": None})
    assert (s.model, s.port, s.dtype) == ("m", 9100, "float32")
    assert s.rewards == {"a": "x", "b": "z"}


def test_bad_models_fail_fast_one_line_each(tiny, tmp_path):
    two_labels = tmp_path / "two_labels"
    LlamaForSequenceClassification.from_pretrained(
        tiny["rm_a"], num_labels=2, ignore_mismatched_sizes=True
    ).save_pretrained(two_labels)
    AutoTokenizer.from_pretrained(tiny["rm_a"]).save_pretrained(two_labels)
    r = serve("--model", str(tiny["base"]),
              "--reward", f"missing={tmp_path / 'nope'}",
              "--reward", "fn=py:no_such_module:score",
              "--reward", f"lm={tiny['base']}",
              "--reward", f"two={two_labels}",
              "--value", "txt=py:tests.rules:vowel_share",
              "--reference", str(tiny["rm_a"]),
              "--baseline", str(tiny["rm_other"]))
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("alignd: error:")]
    assert len(errors) == 7, r.stderr
    text = "\n".join(errors)
    for words in ("--reward missing", "no such folder"), ("--reward fn", "cannot import"), \
                 ("--reward lm", "ForSequenceClassification"), ("--reward two", "one label"), \
                 ("--value txt", "neural"), ("--reference", "ForCausalLM"), ("--baseline", "ForCausalLM"):
        assert any(all(w in ln for w in words) for ln in errors), (words, text)


def test_other_tokenizer_is_a_notice_not_an_error(tiny, tmp_path):
    r = serve("--model", str(tiny["base"]), "--reward", f"o={tiny['rm_other']}", "--reward", "bad=nonsense",
              "--port", "1")
    assert r.returncode == 2
    assert "alignd: note: --reward o: its tokenizer differs" in r.stderr
    assert "--reward bad" in r.stderr


@pytest.mark.parametrize("args,words", [
    (["--reward", "novalue"], "NAME=SPEC"),
    (["--reward", "b@d=x"], "a name is letters"),
    ([], "model"),
])
def test_malformed_flags(args, words):
    r = serve(*args)
    assert r.returncode == 2 and words in r.stderr, r.stderr


def test_the_server_imports_no_training_code():
    """`alignd serve` loads the run-time layers only: the model factory (alignd.training, with
    trl, peft, spaCy ...) stays out of the server's process."""
    code = ("import sys; from alignd.server import app, cli, engine; from alignd.decoders import processor, scheduler; "
            "from alignd.rewards import worker; print(sorted(m for m in sys.modules if m.startswith('alignd.training')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_train_value_help_comes_from_the_factory():
    out = subprocess.run([sys.executable, "-m", "alignd.server.cli", "train-value", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: alignd train-value" in out.stdout and "--backbone-layers" in out.stdout
