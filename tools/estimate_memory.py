#!/usr/bin/env python
"""Per-rank memory, communication and FLOPs of D-CHAG / TP-alone layouts; layout recommendation.

Logic in dchag/planner (see dchag/planner/cli.py for examples). Pure arithmetic: no torch needed.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dchag.planner.cli import main  # noqa: E402


def check_by_simulation(rec, hw, tries):
    """--simulate: the simulation (torch, minutes), imported only when asked for."""
    from dchag.sim.check import check_recommendation
    return check_recommendation(rec, hw, tries)


if __name__ == "__main__":
    sys.exit(main(check_recommendation=check_by_simulation))
