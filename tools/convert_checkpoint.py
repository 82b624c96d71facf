#!/usr/bin/env python
"""Convert, export and verify checkpoints of pretrain_dchag.py.

A training checkpoint is a folder of DeepSpeed files per model-parallel rank (RUN/iter_NNNNNNN,
RUN/latest names the newest). This tool turns it into:

  consolidated  one file of whole parameters, for inference or sharing (no pickle needed):
                  --load-dir RUN_OR_ITER_DIR --save-dir OUT --format consolidated
                -> OUT/model.safetensors + OUT/config.json (model hyperparameters, normalization
                   statistics, channel names/wavelengths, iteration, source layout, versions).
                Works from any T, P, data-parallel size, ZeRO 0-3, fp32 or bf16.
                Use it with dchag.load_pretrained(OUT) or tools/predict.py --load OUT.

                A LoRA run (--lora-rank) is exported with its adapters merged into the weights
                (W + alpha/r B A: a plain model, for any use). --adapters apart writes instead
                OUT/adapters.safetensors (what the run trained: adapters, head, new and
                interpolated tensors) and OUT/config.json referring to the base (the run's
                --pretrained-checkpoint, with its manifest's checksum); the same command on that
                folder (--load-dir OUT --save-dir FULL) merges it with its base into a full export.

  deepspeed     a training checkpoint for another layout, from a consolidated export (or a
                training checkpoint, consolidated on the way):
                  --load-dir OUT --save-dir RUN2 --format deepspeed \\
                  --target-tensor-parallel-size T --target-channel-parallel-size P
                -> continue training with: pretrain_dchag.py --load RUN2 --no-load-optim
                   --tensor-model-parallel-size T --channel-parallel-size P (other flags as before).
                Keeps the iteration, consumed samples and LR schedule; Adam's moments start fresh.

  universal     DeepSpeed's universal checkpoint (weights AND optimizer state, ZeRO 1-3):
                  --load-dir RUN_OR_ITER_DIR --save-dir RUN2 --format universal
                -> continue on any layout with: pretrain_dchag.py --load RUN2 ... (detected by itself).

  --verify      check every file against the manifest saved with it (size + SHA-256), and an
                export's tensors (dtypes as its config.json says, every value finite):
                  --load-dir RUN_OR_ITER_OR_EXPORT --verify      (exit 1 and the damaged file named)

  --describe    what a checkpoint or export is, without loading it: task, architecture, layout and
                iteration, channels (names, wavelength range), tile size, the data it was trained
                on, normalization, size on disk:
                  --describe RUN_OR_ITER_OR_EXPORT
                Reads only the JSON files dchag writes (config.json; dchag_args.json,
                normalization.json) and file names and sizes: no weights, no pickle.

An export without its manifest is loaded with a warning (its dtypes, shapes and values checked)
but not turned into a training checkpoint unless --accept-export-without-manifest is given.

Every conversion first checks its input against the manifest, and refuses an existing,
non-empty --save-dir (nothing is overwritten).

DeepSpeed's own zero_to_fp32.py handles one model-parallel rank and knows nothing of the
tensor/channel shards ("Expected 1 of '*_optim_states.pt' ... but found 2 files" at T > 1):
use --format consolidated, which runs it per model-parallel rank and merges the shards.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--describe", metavar="PATH", default=None,
                   help="say what PATH (an export, a run folder or an iter_* folder) is; loads no weights")
    p.add_argument("--load-dir",
                   help="a run folder (its 'latest' checkpoint), one RUN/iter_NNNNNNN folder, or a consolidated "
                        "export (--format deepspeed, --verify)")
    p.add_argument("--save-dir", help="output folder; must not exist or be empty")
    p.add_argument("--format", choices=("consolidated", "deepspeed", "universal"),
                   help="what to write (see above)")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1,
                   help="--format deepspeed: T of the new layout (default 1)")
    p.add_argument("--target-channel-parallel-size", type=int, default=1,
                   help="--format deepspeed: P of the new layout, P | T and P | G (default 1)")
    p.add_argument("--adapters", choices=("merge", "apart"), default="merge",
                   help="--format consolidated of a LoRA run: merge the adapters into the weights (default), or write "
                        "them apart beside a reference to the base")
    p.add_argument("--verify", action="store_true",
                   help="only check the files against their manifest (an export: also its dtypes and that every "
                        "value is finite)")
    p.add_argument("--accept-export-without-manifest", action="store_true",
                   help="--format deepspeed: convert an export that has no manifest.json (refused otherwise: nothing "
                        "shows its files are the ones exported; its dtypes, shapes and values are still checked)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|cuda_graph_scope).*")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dchag.checkpointing import convert
    from dchag.checkpointing.errors import CheckpointError
    try:
        if args.describe:
            from dchag.checkpointing import describe
            print("\n".join(describe.lines(describe.describe(args.describe))))
            return 0
        if not args.load_dir:
            raise CheckpointError("give --load-dir (with --format or --verify), or --describe PATH.")
        if args.verify:
            bad = 0
            for folder, problems in convert.verify(args.load_dir):
                print(f"{'OK     ' if not problems else 'DAMAGED'} {folder}")
                for line in problems:
                    print(f"        {line}")
                bad += bool(problems)
            return 1 if bad else 0
        if not args.format or not args.save_dir:
            raise CheckpointError("give --format {consolidated,deepspeed,universal} and --save-dir OUT (or --verify).")
        from dchag.transfer import adapters
        if args.adapters == "apart" and args.format != "consolidated":
            raise CheckpointError("--adapters apart is an option of --format consolidated.")
        if args.format == "consolidated" and adapters.is_apart(args.load_dir):
            adapters.merge_apart(args.load_dir, args.save_dir)
        elif args.format == "consolidated" and args.adapters == "apart":
            adapters.export_apart(args.load_dir, args.save_dir)
        elif args.format == "consolidated":
            convert.export_consolidated(args.load_dir, args.save_dir)
        elif args.format == "deepspeed":
            convert.to_deepspeed(args.load_dir, args.save_dir, args.target_tensor_parallel_size,
                                 args.target_channel_parallel_size, args.accept_export_without_manifest)
        else:
            convert.to_universal(args.load_dir, args.save_dir)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # layout errors, a base that cannot be read (FinetuneError): one line, non-zero
        from dchag.parallel.partition import LayoutError
        from dchag.transfer.errors import FinetuneError
        if isinstance(e, (FinetuneError, LayoutError)):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
