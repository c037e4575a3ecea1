"""`make image-test`: the cpu image, run for real.

Serves the tests' tiny random models (built here, mounted read-only) from the image under an
arbitrary UID of group 0, waits for the image's own HEALTHCHECK to say healthy, asks
/v1/models, a plain and an ARGS completion through the openai client, then `docker stop`s
the container while a streamed completion is still running: the stream must end whole and the
container must exit 0 within the grace period. Leaves no container behind; re-runnable.

Run from the repository root with PYTHONPATH=. (it imports tests.tiny_models).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import yaml

from tests.tiny_models import build_all

NAME = "alignd-image-test"
KEY = "image-test-key"
MAX_TOKENS = 192  # the drain check's stream: long enough to be running when SIGTERM comes


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and out.returncode:
        raise RuntimeError(f"docker {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def models(work: Path) -> Path:
    root = work / "models"
    paths = build_all(root)
    config = {"model": "/models/base", "served_model_name": "tiny", "dtype": "float32",
              "max_model_len": 512, "rewards": {"a": "/models/rm_a"}}
    (root / "serve.yaml").write_text(yaml.safe_dump(config))
    # The container runs as a UID that owns nothing here.
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    assert paths["base"].is_dir()
    return root


def run(image: str, root: Path, port: int) -> None:
    docker("rm", "-f", "-v", NAME, check=False)
    docker("run", "--detach", "--name", NAME, "--network", "host", "--user", "4321:0",
           "--shm-size", "1g", "--health-interval", "2s",
           "--env", f"ALIGND_PORT={port}", "--env", f"ALIGND_API_KEY={KEY}",
           "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--env", "HF_HUB_OFFLINE=1",
           "--volume", f"{root}:/models:ro",
           image, "--config", "/models/serve.yaml", "--host", "127.0.0.1", "--port", str(port))


def wait_healthy(limit: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit:
        state = json.loads(docker("inspect", "--format", "{{json .State}}", NAME))
        if not state["Running"]:
            raise RuntimeError(f"the container exited with {state['ExitCode']} before it was healthy")
        if state.get("Health", {}).get("Status") == "healthy":
            return time.monotonic() - start
        time.sleep(1)
    raise RuntimeError(f"not healthy within {limit:.0f} s")


def requests(url: str) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny"], ids
    plain = client.completions.create(model="tiny", prompt="the movie was", max_tokens=8, temperature=0)
    assert plain.usage.completion_tokens > 0 and plain.choices[0].finish_reason in ("length", "stop"), plain
    guided = client.completions.create(
        model="tiny", prompt="the movie was", max_tokens=8, temperature=0,
        extra_body={"alignment": {"decoder": "args", "rewards": {"a": 2.0}, "top_k": 4}})
    meta = guided.choices[0].model_extra["alignment"]
    assert meta["decoder"] == "args" and "a" in meta["rewards"], meta
    # The key came from the environment (ALIGND_API_KEY): without it, 401.
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
    return {"models": ids, "plain": plain.choices[0].text, "args": guided.choices[0].text, "args_alignment": meta}


def stop_during_stream(url: str, grace: int) -> dict:
    """docker stop while a streamed completion runs: the stream must end whole."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=grace + 60)
    stream = client.completions.create(
        model="tiny", prompt="the movie was", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # the request is running in the engine now
    stop: dict = {}

    def stopper() -> None:
        t0 = time.monotonic()
        stop["rc"] = subprocess.run([DOCKER, "stop", "--time", str(grace), NAME], capture_output=True).returncode
        stop["seconds"] = round(time.monotonic() - t0, 1)

    thread = threading.Thread(target=stopper)
    thread.start()
    finish, usage, error = None, None, None
    try:
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                usage = chunk.usage.completion_tokens
    except Exception as e:  # a cut stream surfaces as a connection or decoding error
        error = f"{type(e).__name__}: {e}"
    thread.join()
    state = json.loads(docker("inspect", "--format", "{{json .State}}", NAME))
    return {"stop_seconds": stop["seconds"], "docker_stop_rc": stop["rc"], "exit_code": state["ExitCode"],
            "oom_killed": state["OOMKilled"], "stream_finish": finish, "stream_tokens": usage,
            "stream_error": error}


def main() -> int:
    global DOCKER
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="alignd:cpu")
    p.add_argument("--docker", default=os.environ.get("DOCKER", "/usr/bin/docker"))
    p.add_argument("--work", type=Path, default=Path("build/image-test"))
    p.add_argument("--grace", type=int, default=60, help="docker stop's grace period (> --shutdown-timeout, 30 s)")
    p.add_argument("--start-limit", type=float, default=900)
    args = p.parse_args()
    DOCKER = args.docker
    t0 = time.monotonic()
    root = models(args.work.resolve())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    result: dict = {"image": args.image, "image_bytes": int(docker("image", "inspect", "-f", "{{.Size}}", args.image))}
    run(args.image, root, port)
    try:
        result["healthy_after_s"] = round(wait_healthy(args.start_limit), 1)
        inside = docker("exec", NAME, "sh", "-c", "id -u; id -g; cat /proc/1/comm").split()
        result["uid_gid_pid1"] = inside
        assert inside == ["4321", "0", "tini"], inside
        result.update(requests(url))
        result.update(stop_during_stream(url, args.grace))
    except Exception:
        subprocess.run([DOCKER, "logs", "--tail", "60", NAME], stderr=sys.stderr, stdout=sys.stderr)
        raise
    finally:
        result["total_s"] = round(time.monotonic() - t0, 1)
        logs = subprocess.run([DOCKER, "logs", NAME], capture_output=True, text=True)
        (args.work / "container.log").write_text(logs.stdout + logs.stderr)
        docker("rm", "-f", "-v", NAME, check=False)
        (args.work / "result.json").write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps(result, indent=1, default=str))
    problems = []
    if result["exit_code"] != 0:
        problems.append(f"the container exited with {result['exit_code']}, not 0, on docker stop")
    if result["stop_seconds"] >= args.grace:
        problems.append(f"docker stop took {result['stop_seconds']} s: the grace period ran out (SIGKILL)")
    if result["stream_error"] or result["stream_finish"] != "length" or result["stream_tokens"] != MAX_TOKENS:
        problems.append(f"the stream in flight at docker stop was cut: finish {result['stream_finish']}, "
                        f"{result['stream_tokens']} of {MAX_TOKENS} tokens, error {result['stream_error']}")
    for line in problems:
        print(f"image-test: FAIL: {line}", file=sys.stderr)
    if not problems:
        print(f"image-test: passed in {result['total_s']} s (healthy after {result['healthy_after_s']} s, "
              f"docker stop {result['stop_seconds']} s, exit 0)")
    return 1 if problems else 0


DOCKER = "/usr/bin/docker"

if __name__ == "__main__":
    sys.exit(main())
