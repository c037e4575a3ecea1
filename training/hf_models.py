"""Small helpers over transformers configs and tokenizers that every stage of the factory uses."""

from __future__ import annotations


def pad_id(tokenizer) -> int:
    """The pad id to save and to pool at: the tokenizer's pad token, else its EOS. transformers'
    sequence classifiers pool at the last non-pad token, and so does alignd's runtime: one pad id
    keeps training, `from_pretrained` users and the server in agreement."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def keep_layers(cfg, first: int, last: int) -> None:
    """Cut a config to its decoder layers first..last-1 (and their per-layer attention kinds,
    which Qwen- and Gemma-style configs list)."""
    cfg.num_hidden_layers = last - first
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[first:last]


def one_label(cfg, tokenizer) -> None:
    """Make a causal LM's config that of a one-output sequence classifier (a reward or value)."""
    cfg.architectures = [(cfg.architectures or ["LlamaForCausalLM"])[0].replace("ForCausalLM", "ForSequenceClassification")]
    cfg.num_labels = 1
    cfg.problem_type = "regression"
    cfg.pad_token_id = pad_id(tokenizer)


def encode(tokenizer, prompt: str | list[dict], chat: bool) -> list[int]:
    """Token ids as alignd's server sees a request: chat messages through the chat template (its
    text holds every special token, so none is added again), raw text as the completions
    endpoint encodes it (with the tokenizer's special tokens)."""
    if not chat and isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
