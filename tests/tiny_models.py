"""Tiny random-weight models that the tests build for themselves (no hub, no committed weights).

Every model shares one BPE tokenizer trained here on a small built-in corpus, so the reward and
value models take the fast KV-cached path. head_dim is 32: vLLM's CPU attention refuses less.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CORPUS = """
the movie was great and the acting was wonderful . i loved every minute of it .
the film was terrible , boring and far too long . i hated the ending .
a good story with bad dialogue . the music was beautiful but the plot was weak .
what a lovely day to walk in the park with friends and a dog .
the service at the restaurant was slow and the food was cold .
she said that the book was better than the movie , and he agreed .
we went to the sea , swam in the cold water and ate fresh fish .
this is the worst thing i have ever seen , awful and sad .
this is the best thing i have ever seen , happy and bright .
numbers one two three four five six seven eight nine ten .
""".strip().splitlines()

# `name` and the template variable `prefill` let the tests see that a message's name and a
# request's chat_template_kwargs reach the template.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m.name is defined %}{{ m.name }}: {% endif %}"
    "{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% if prefill is defined %}{{ prefill }}{% endif %}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(out: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def _config(tok: PreTrainedTokenizerFast, layers: int, hidden: int, heads: int, kv_heads: int):
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=32,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
    # A large init spreads the logits, so a tie between candidates is practically impossible
    # and token-for-token comparisons with an independent implementation are meaningful.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_lm(out: Path, tok: PreTrainedTokenizerFast, seed: int, layers: int = 2) -> Path:
    model = LlamaForCausalLM(_config(tok, layers, 128, 4, 2))
    _randomize(model, seed, std=0.08)
    model.generation_config.eos_token_id = None  # tests decide when to stop
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_reward(out: Path, tok: PreTrainedTokenizerFast, seed: int, layers: int = 2) -> Path:
    cfg = _config(tok, layers, 96, 3, 1)
    cfg.num_labels = 1
    model = LlamaForSequenceClassification(cfg)
    _randomize(model, seed, std=0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_all(root: Path) -> dict[str, Path]:
    """Build (once) under `root`: two base LMs and two reward models sharing one tokenizer, and
    a reward model with a tokenizer of its own (the re-tokenizing path)."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "built.json"
    names = {"base": 1, "base2": 2, "rm_a": 11, "rm_b": 12, "rm_other": 13}
    paths = {name: root / name for name in names}
    if stamp.exists():
        return paths
    tok = build_tokenizer(root / "tokenizer")
    build_lm(paths["base"], tok, names["base"])
    build_lm(paths["base2"], tok, names["base2"])
    build_reward(paths["rm_a"], tok, names["rm_a"])
    build_reward(paths["rm_b"], tok, names["rm_b"])
    other = build_tokenizer(root / "tokenizer_other", vocab_size=320)
    build_reward(paths["rm_other"], other, names["rm_other"])
    stamp.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    return paths
