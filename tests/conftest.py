from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.tiny_models import build_all  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models shared by the whole test session (built once, in a temp folder)."""
    return build_all(tmp_path_factory.mktemp("tiny"))


API_KEY = "test-key"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, model: str, config: dict, log: Path, proc, loading: list[tuple[int, int]]) -> None:
        self.url, self.model, self.config, self.log, self.proc = url, model, config, log, proc
        self.loading = loading  # (/health, /ready) statuses answered while the model loaded

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)

    def http(self):
        import httpx

        # verify=False: these are plain-HTTP clients, and loading the CA bundle for each costs
        # seconds of CPU on a busy two-core machine.
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600,
                            verify=False)

    def metric(self, name: str) -> float:
        import httpx

        if not hasattr(self, "_metrics"):
            self._metrics = httpx.Client(base_url=self.url, timeout=30, verify=False)
        for line in self._metrics.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)


def start_server(config: dict, work: Path, key_file: bool = False, env: dict[str, str] | None = None):
    """Start `alignd serve --config` as a real process on a free port; yield a Server once its
    /ready answers 200. The API key is a flag, or with `key_file` a mounted-secret file named by
    ALIGND_API_KEY_FILE. `env`: more environment for the server."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import yaml

    root = Path(__file__).resolve().parent.parent
    (work / "serve.yaml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = work / "server.log"
    env = {**os.environ, "PYTHONPATH": str(root), "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    key = ["--api-key", API_KEY]
    if key_file:
        (work / "api-key").write_text(API_KEY + "\n")
        env["ALIGND_API_KEY_FILE"], key = str(work / "api-key"), []
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alignd.server.cli", "serve", "--config", str(work / "serve.yaml"),
             "--port", str(port), *key],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    loading: list[tuple[int, int]] = []
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")
            try:
                ready = httpx.get(f"{url}/ready", timeout=2).status_code
                if ready == 200:
                    break
                loading.append((httpx.get(f"{url}/health", timeout=2).status_code, ready))
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield Server(url, config.get("served_model_name", config["model"]), config, log, proc, loading)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:  # a fault test ended it already
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def server(tiny, tmp_path_factory):
    """One real alignd server (real vLLM CPU engine, real socket) with every kind of guide,
    shared by the whole session."""
    config = {
        "model": str(tiny["base"]),
        "served_model_name": "tiny",
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 32,
        "max_concurrent_requests": 16,
        "max_request_bytes": 65536,
        "allow_reward_recompute": True,
        # Decoder tests run slow recomputing rewards side by side, and the isolation tests a heavy
        # Transfer Q* request: limits far above the defaults.
        "guide_step_budget": 1_000_000,
        "max_guide_tokens_in_flight": 1_000_000,
        "max_guide_tokens_per_step": 30_000,
        "rewards": {
            "a": str(tiny["rm_a"]),
            "b": str(tiny["rm_b"]),
            "other": str(tiny["rm_other"]),
            "vowels": "py:tests.rules:vowel_share",
        },
        "values": {"va": str(tiny["rm_a"]), "vb": str(tiny["rm_b"])},
        "reference": str(tiny["base2"]),
        "baseline": str(tiny["base2"]),
    }
    yield from start_server(config, tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="session")
def bare_server(tiny, tmp_path_factory):
    """A server with one reward and nothing else: for requests naming guides it lacks."""
    config = {"model": str(tiny["base"]), "served_model_name": "tiny", "dtype": "float32",
              "max_model_len": 256, "rewards": {"a": str(tiny["rm_a"])}}
    yield from start_server(config, tmp_path_factory.mktemp("bare"))


def hostile_config(tiny) -> dict:
    """Default limits, and a text reward that misbehaves on purpose (tests.rules.moody)."""
    return {
        "model": str(tiny["base"]), "served_model_name": "tiny", "dtype": "float32", "max_model_len": 512,
        "max_num_seqs": 32, "max_concurrent_requests": 16, "max_concurrent_samples": 40,
        "max_request_bytes": 65536, "text_reward_timeout": 1.0, "queue_timeout": 3.0,
        "max_guide_tokens_in_flight": 8192,
        "rewards": {"a": str(tiny["rm_a"]), "b": str(tiny["rm_b"]), "moody": "py:tests.rules:moody"},
        "values": {"va": str(tiny["rm_a"])},
        "reference": str(tiny["base2"]),
        "baseline": str(tiny["base2"]),
    }


@pytest.fixture(scope="session")
def hostile_server(tiny, tmp_path_factory):
    """A server at default limits with a misbehaving text reward: for hostile input and isolation."""
    yield from start_server(hostile_config(tiny), tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="session")
def budget_server(tiny, tmp_path_factory):
    """A server whose engine may run only 24 guide tokens a step (an ARGS row with top_k 4 and
    one reward costs 4): guided rows take turns. Its `slow` text reward costs 50 ms a call."""
    config = {"model": str(tiny["base"]), "served_model_name": "tiny", "dtype": "float32",
              "max_model_len": 256, "max_num_seqs": 32, "guide_step_budget": 24,
              "rewards": {"a": str(tiny["rm_a"]), "slow": "py:tests.rules:slow_vowels"}}
    yield from start_server(config, tmp_path_factory.mktemp("budget"))
