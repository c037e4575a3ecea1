"""The offline model factory: the demo models of `alignd models build` (samples, fitted reward
models, a DPO-aligned model, a VAS value model) and `alignd train-value`. Nothing here runs in
the server."""
