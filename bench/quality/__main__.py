"""`python -m bench.quality ...` (from the repository root): the alignment-quality benchmark
(see bench/quality/cli.py)."""

import sys

from bench.quality.cli import main

if __name__ == "__main__":
    sys.exit(main())
