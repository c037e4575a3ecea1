"""The guide runtime: what runs inside the vLLM engine worker (guide models, their caches,
text rewards, the worker RPC). The offline model factory is `alignd.training`."""
