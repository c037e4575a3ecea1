"""alignd: inference-time alignment (guided decoding) served inside vLLM.

The code lives in top-level folders, installed as `alignd.<folder>` (see pyproject.toml): at run
time `server/` (HTTP), `decoders/` (the guided decoders, in the engine) and `rewards/` (the guide
models they run, in the engine worker); offline, `training/` (the model factory: demo models,
reward fitting, DPO, value training). The server imports nothing from `training/`.
"""

__version__ = "0.1.0"
