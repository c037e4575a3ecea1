"""`python bench/quality ...`: the alignment-quality benchmark (see bench/quality/cli.py)."""

import sys
from pathlib import Path

# Run as a folder: make `quality` importable as a package (bench/ is not one).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from quality.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
