#!/usr/bin/env python
"""One rank of an N-rank D-CHAG training job, simulated with the real model on fake tensors in one
CPU process: per-rank parameters, gradients, optimizer state, activations, peak memory and every
collective, beside the planner's prediction.

Logic in dchag/sim (see dchag/sim/cli.py for examples); flags are pretrain_dchag.py's plus
--world-size, --rank and --json.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dchag.sim.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
