#!/usr/bin/env python
"""D-CHAG-L, D-CHAG-C and tensor parallelism alone, measured side by side on CPU gloo ranks.

Logic in dchag/bench (see dchag/bench/cli.py). Spawns T ranks per tensor-parallel size.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dchag.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
