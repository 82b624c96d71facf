"""The transfer study of docs/TRANSFER.md: pretrain MAE on 211-band synthetic scenes (400-2,500 nm, 64 x 64 px
in 16 x 16 tiles), then fine-tune, train from scratch and probe (frozen encoder) on (a) the same kind of scenes at
13 Sentinel-2-like bands and (b) abundance regression from 8 labelled tiles, for flat and D-CHAG-L, over paired
seeds (dchag/parity/transfer_study.py says what each run is).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python tools/transfer_study.py \\
        --output-dir runs/transfer --seeds 5

``--study blend`` (docs/TRANSFER.md, "Several sensors"): D-CHAG-L pretrained on the 211-band scenes alone and
blended with a 13-band Sentinel-2-like and a 50-band 900-1,700 nm sensor, then fine-tuned, probed and trained from
scratch on 9 Landsat-8-OLI-like bands that neither pretraining saw:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tools/transfer_study.py --study blend \\
        --output-dir runs/transfer-blend --seeds 5

``--study cube``: the same question on the bundled 450-band cube (the demo's model): pretrained on the cube alone and
blended with its Sentinel-2-like and 50-band resamplings, then onto its 9 Landsat-like bands (written to DIR/data/):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python tools/transfer_study.py --study cube \\
        --output-dir runs/transfer-cube --seeds 5

One process, every run in it (``dchag.training.run``); each leaves DIR/results/NAME.json and
DIR/logs/NAME.log, and a run whose JSON exists is skipped, so the same command resumes a study that
stopped. At the end: DIR/transfer.json, DIR/transfer.md (the tables and one command per kind of run)
and DIR/transfer.png. ``--report-only`` writes the report from the finished runs without training.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pretrain_dchag, dchag


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output-dir", default="runs/transfer")
    p.add_argument("--seeds", type=int, default=5, help="seeds 1 .. N, paired across regimes (default: %(default)s)")
    p.add_argument("--study", choices=("sensors", "blend", "cube"), default="sensors",
                   help="sensors: the 211-band pretraining onto S2-like bands and regression; blend: one sensor "
                        "against a blend of three, onto an unseen Landsat-like sensor; cube: the same on the bundled "
                        "450-band cube (default: %(default)s)")
    p.add_argument("--methods", default=None, help="parity-style method specs (default: flat,linear; blend: linear)")
    p.add_argument("--pretrain-iters", type=int, default=None, help="default: 300 (cube: 400)")
    p.add_argument("--finetune-iters", type=int, default=None, help="default: 100 (cube: 200)")
    p.add_argument("--only", default=None, help="comma list: stages to run (pretrain, pretrain-blend, and the "
                                                "downstream names: s2, regress; l8)")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished runs only")
    ours = p.parse_args(argv)

    from dchag.parallel.partition import LayoutError
    from dchag.parity.transfer_study import (StudyConfig, blend_study, cube_study, plan, result_path, run_one,
                                             write_cube_sensors, write_report)
    if ours.seeds < 1 or (ours.pretrain_iters or 1) < 1 or (ours.finetune_iters or 1) < 1:
        print("error: --seeds, --pretrain-iters and --finetune-iters must be >= 1.", file=sys.stderr)
        return 1
    try:
        chosen = {k: v for k, v in (("seeds", ours.seeds), ("pretrain_iters", ours.pretrain_iters),
                                     ("finetune_iters", ours.finetune_iters), ("methods", ours.methods)) if v}
        if ours.study == "cube":
            cube = os.path.join("data", "samples", "fenix_450band", "image.hdr")
            cfg = cube_study(cube, write_cube_sensors(cube, os.path.join(ours.output_dir, "data")), **chosen)
        else:
            cfg = blend_study(**chosen) if ours.study == "blend" else StudyConfig(**chosen)
        runs = plan(cfg, ours.output_dir)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    only = None if ours.only is None else set(ours.only.split(","))
    results = []
    if not ours.report_only:
        import pretrain_dchag
        from dchag.training.initialize import init_distributed
        init_distributed()
        todo = [r for r in runs if only is None or r.stage in only]
        for i, spec in enumerate(todo, 1):
            done_before = os.path.exists(result_path(ours.output_dir, spec))
            r = run_one(spec, ours.output_dir, model_provider=pretrain_dchag.model_provider,
                        forward_step=pretrain_dchag.forward_step, datasets_provider=pretrain_dchag.datasets_provider,
                        eval_metrics_func=pretrain_dchag.task_metrics, loss_weight_func=pretrain_dchag.loss_weight)
            print(f"[transfer] ({i}/{len(todo)}) {spec.name}: val loss {r['val_loss']:.6E}"
                  + (" (finished before)" if done_before else f" ({r['seconds']:.0f} s)"), flush=True)
    import json
    for spec in runs:
        path = result_path(ours.output_dir, spec)
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
    for path in write_report(results, cfg, runs, ours.output_dir):
        print(f"> wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
