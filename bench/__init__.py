"""alignd's benchmarks, run from the repository root: `python bench/NAME.py ...` for the speed
and load benchmarks, `python -m bench.quality ...` for the quality benchmark."""
