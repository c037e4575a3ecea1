"""Start-up: settings from flags > ALIGND_* environment > YAML > defaults, and every bad model
reported in one clear line before any engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer, LlamaForSequenceClassification

from alignd.server.cli import build_parser, settings_of
from alignd.server.config import ServeSettings, load_settings

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


@pytest.fixture
def clean_env(monkeypatch):
    """No ALIGND_* variable of the test run's own environment reaches the settings."""
    for name in list(os.environ):
        if name.startswith("ALIGND_"):
            monkeypatch.delenv(name)
    return monkeypatch


def parsed(*argv: str) -> ServeSettings:
    """`alignd serve ARGV`'s settings, through its own parser, without starting anything."""
    return settings_of(build_parser().parse_args(["serve", *argv]))


def test_precedence_flags_then_environment_then_yaml_then_defaults(tmp_path, clean_env):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "port": 9000, "dtype": "float32", "max_num_seqs": 5,
                                   "exit_on_engine_death": True, "rewards": {"a": "yaml", "b": "yaml"}}))
    clean_env.setenv("ALIGND_PORT", "9100")
    clean_env.setenv("ALIGND_DTYPE", "bfloat16")
    clean_env.setenv("ALIGND_EXIT_ON_ENGINE_DEATH", "false")
    clean_env.setenv("ALIGND_REWARDS", json.dumps({"b": "env", "c": "env"}))
    s = parsed("--config", str(cfg), "--port", "9200", "--reward", "c=flag")
    assert s.port == 9200  # flag over environment over YAML
    assert s.dtype == "bfloat16" and s.exit_on_engine_death is False  # environment over YAML
    assert s.max_num_seqs == 5 and s.model == "m"  # YAML over defaults
    assert s.host == "127.0.0.1" and s.shutdown_timeout == 30.0  # defaults
    assert s.rewards == {"a": "yaml", "b": "env", "c": "flag"}  # merged by name, each name by precedence
    clean_env.setenv("ALIGND_CONFIG", str(cfg))  # the file itself from the environment
    assert parsed().max_num_seqs == 5


# One value for every setting, other than its default: a new setting needs a line here.
SAMPLES = {
    "model": "m2", "rewards": {"r": "py:tests.rules:vowel_share"}, "values": {"v": "some/value-model"},
    "reference": "ref", "baseline": "base", "text_reward_timeout": 3.5, "guide_step_budget": 77,
    "guide_time_share": 0.5, "host": "0.0.0.0", "port": 9123, "api_key": "k1", "api_key_file": None,
    "dtype": "bfloat16", "max_model_len": 128, "served_model_name": "srv", "max_num_seqs": 3,
    "max_concurrent_requests": 4, "max_concurrent_samples": 5, "max_samples_per_request": 6,
    "max_request_bytes": 2048, "max_guide_tokens_per_step": 7, "queue_timeout": 8.5,
    "max_guide_tokens_in_flight": 9, "rpc_timeout": 10.5, "shutdown_timeout": 11.5,
    "stream_keepalive": 4.5, "exit_on_engine_death": False, "gpu_memory_utilization": 0.5, "tensor_parallel_size": 2,
    "pipeline_parallel_size": 2, "seed": 7, "allow_reward_recompute": True,
}


def _ways(name: str, value, tmp_path: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """`name = value` given each way: (argv, environment)."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({name: value, **({} if name == "model" else {"model": "m"})}))
    base = [] if name == "model" else ["--model", "m"]
    env_value = json.dumps(value) if isinstance(value, dict) else str(value).lower() if isinstance(value, bool) \
        else str(value)
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        flags = [flag if value else "--no-" + flag[2:]]
    elif isinstance(value, dict):
        flags = [a for k, v in value.items() for a in ("--" + name[:-1], f"{k}={v}")]
    else:
        flags = [flag, str(value)]
    return {"yaml": (["--config", str(cfg)], {}), "environment": (base, {"ALIGND_" + name.upper(): env_value}),
            "flag": (base + flags, {})}


@pytest.mark.parametrize("name", sorted(ServeSettings.model_fields))
def test_every_setting_is_reachable_three_ways(name, tmp_path, clean_env):
    assert set(SAMPLES) == set(ServeSettings.model_fields), "give the new setting a sample value above"
    value = SAMPLES[name]
    if name == "api_key_file":  # a path whose file holds the key
        (tmp_path / "key").write_text("from-file\n")
        value = str(tmp_path / "key")
    for way, (argv, env) in _ways(name, value, tmp_path).items():
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            got = getattr(parsed(*argv), name)
        if name == "api_key":
            got = got.get_secret_value()
        assert got == (Path(value) if name == "api_key_file" else value), (way, got)


def test_api_key_file_is_one_setting_with_api_key(tmp_path, clean_env):
    """A mounted secret: the key comes from the file; the key and its file are one setting, so a
    higher layer that gives either replaces both."""
    secret = tmp_path / "key"
    secret.write_text("file-key\n")
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "api_key": "yaml-key"}))
    assert parsed("--config", str(cfg)).api_key.get_secret_value() == "yaml-key"
    clean_env.setenv("ALIGND_API_KEY_FILE", str(secret))
    s = parsed("--config", str(cfg))
    assert s.api_key.get_secret_value() == "file-key" and "file-key" not in repr(s)
    assert parsed("--config", str(cfg), "--api-key", "flag-key").api_key.get_secret_value() == "flag-key"
    with pytest.raises(ValueError, match="give the key one way"):
        parsed("--model", "m", "--api-key", "a", "--api-key-file", str(secret))
    with pytest.raises(ValueError, match="cannot read"):
        parsed("--model", "m", "--api-key-file", str(tmp_path / "missing"))


def test_a_bad_setting_is_reported_without_its_value(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"model": "m", "api_key": 918273645, "port": "nine"}))
    r = serve("--config", str(cfg))
    assert r.returncode == 2
    assert "api_key:" in r.stderr and "port:" in r.stderr, r.stderr
    assert "918273645" not in r.stderr + r.stdout


def test_parallel_sizes_reach_vllm(tiny, clean_env):
    from alignd.server.engine import Engine

    args = Engine(parsed("--model", str(tiny["base"]), "--tensor-parallel-size", "2",
                         "--pipeline-parallel-size", "3")).engine_args()
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 3)


def test_forcing_model_runner_v2_is_one_clear_line(tiny):
    r = subprocess.run([sys.executable, "-m", "alignd.server.cli", "serve", "--model", str(tiny["base"])],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "VLLM_USE_V2_MODEL_RUNNER": "1"})
    assert r.returncode == 2
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("alignd: error:")]
    assert len(errors) == 1 and "VLLM_USE_V2_MODEL_RUNNER=1" in errors[0] and "V1-interface" in errors[0], r.stderr


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
