"""alignd: inference-time alignment (guided decoding) served inside vLLM.

The code lives in the top-level folders `server/`, `decoders/` and `rewards/`, installed as
`alignd.server`, `alignd.decoders` and `alignd.rewards` (see pyproject.toml).
"""

__version__ = "0.1.0"
