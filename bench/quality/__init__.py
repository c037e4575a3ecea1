"""Alignment-quality benchmark of alignd's decoders on real prompts (sentiment steering, detoxification)."""
