"""What a checkpoint is, without loading it: ``tools/convert_checkpoint.py --describe PATH``.

PATH is a consolidated export, a training run folder (``--save``: its newest complete checkpoint)
or one ``iter_NNNNNNN`` folder. Only what dchag itself wrote as JSON is read (``config.json`` of an
export; ``dchag_args.json``, ``normalization.json`` and ``manifest.json`` of a checkpoint) and the
folder's file names and sizes: no weights, and no DeepSpeed model-states file (those are pickles).
What those files do not record (a DeepSpeed checkpoint's ZeRO stage, LR schedule) is inferred from
file names where it can be, and otherwise said to be unknown.
"""

from __future__ import annotations

import glob
import json
import os
import re

from dchag.checkpointing import consolidated, normalization
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.tags import TAG_RE, folder_hint, iteration_of, resume_point

_AGGREGATIONS = {"flat": "flat (every channel its own token)", "linear": "D-CHAG-L (linear)",
                 "cross": "D-CHAG-C (cross-attention)"}


def _folder_size(path: str) -> tuple[int, int]:
    total, count = 0, 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
            count += 1
    return total, count


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path} ({e}); the file is damaged.") from e


def _checkpoint_folder(path: str) -> str:
    """RUN -> its newest complete checkpoint (as a resume picks it); an iter_* folder as it is."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a folder: give a consolidated export, a --save folder or one of its "
                              "iter_NNNNNNN folders.")
    if glob.glob(os.path.join(path, "*model_states.pt")) or os.path.exists(os.path.join(path, "dchag_args.json")):
        return path
    tag, _ = resume_point(path, pick=folder_hint)  # --describe takes a folder, not --ckpt-step
    if tag is None:
        raise CheckpointError(f"{path} is neither a consolidated export nor a checkpoint of pretrain_dchag.py (no "
                              "config.json, no dchag_args.json, no complete iter_NNNNNNN folder).")
    return os.path.join(path, tag)


def describe(path: str) -> dict:
    """The facts, as a dict (``lines(describe(path))`` is what the tool prints)."""
    if consolidated.is_consolidated(path):
        config = consolidated.read_config(path)
        model = dict(config.get("model") or {})
        args = dict(config.get("training_args") or {})
        source = dict(config.get("source") or {})
        params = config.get("parameters") or {}
        count = sum(_numel(spec["shape"]) for spec in params.values()) if params else None
        size, files = _folder_size(path)
        return {"kind": "consolidated export", "path": path, "iteration": config.get("iteration"),
                "consumed_samples": config.get("consumed_samples"), "model": model, "args": args,
                "layout": {"tensor_model_parallel_size": source.get("tensor_model_parallel_size"),
                           "channel_parallel_size": source.get("channel_parallel_size"),
                           "data_parallel_size": source.get("data_parallel_size"),
                           "zero_stage": source.get("zero_stage"), "bf16": source.get("bf16")},
                "channel_names": config.get("channel_names") or model.get("channel_names"),
                "wavelengths": config.get("wavelengths") or model.get("wavelengths"),
                "normalization": config.get("normalization"), "targets": config.get("targets"),
                "mask_ratio": config.get("mask_ratio"), "lead_time": config.get("lead_time"),
                "parameters": count, "size": size, "files": files, "versions": config.get("versions")}
    folder = _checkpoint_folder(path)
    margs = _read_json(os.path.join(folder, "dchag_args.json"))
    if margs is None:
        raise CheckpointError(f"{folder} has no dchag_args.json (saved by an older version?): what it holds is only "
                              "in its pickled model-states files, which --describe does not open; export it "
                              "(--format consolidated) and describe the export.")
    norm = normalization.read(folder)
    name = os.path.basename(os.path.normpath(folder))
    optim = glob.glob(os.path.join(folder, "*optim_states.pt"))
    dp = len({re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1) for f in optim
              if re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f))}) or None
    size, files = _folder_size(folder)
    model = {"task": margs.get("task"), "num_channels": margs.get("num_channels"), "img_h": margs.get("img_h"),
             "img_w": margs.get("img_w"), "patch_dim": margs.get("patch_dim"), "num_layers": margs.get("num_layers"),
             "hidden_size": margs.get("hidden_size"), "num_attention_heads": margs.get("num_attention_heads"),
             "ffn_hidden_size": margs.get("ffn_hidden_size"), "aggregation": margs.get("dchag_aggregation"),
             "groups": margs.get("dchag_groups"), "tree_levels": margs.get("dchag_tree_levels"),
             "num_outputs": margs.get("num_outputs"), "channel_embedding": margs.get("channel_embedding")}
    norm = norm or {}
    return {"kind": "training checkpoint (DeepSpeed)", "path": folder,
            "iteration": iteration_of(name) if TAG_RE.match(name) else None, "consumed_samples": None,
            "model": model, "args": {"data_path": norm.get("data_path"), "data_format": norm.get("data_format")},
            "layout": {"tensor_model_parallel_size": margs.get("tensor_model_parallel_size"),
                       "channel_parallel_size": margs.get("channel_parallel_size"), "data_parallel_size": dp,
                       "zero_stage": ">= 1 (optimizer shards)" if optim else "0 or weights only (no optimizer shards)",
                       "bf16": margs.get("bf16")},
            "channel_names": margs.get("channel_names") or norm.get("channel_names"),
            "wavelengths": margs.get("wavelengths") or norm.get("wavelengths"),
            "normalization": norm or None, "targets": norm.get("targets"), "mask_ratio": None, "lead_time": None,
            "parameters": None, "size": size, "files": files, "versions": None}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _human(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1024 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


def _names(names: list, limit: int = 6) -> str:
    names = [str(n) for n in names]
    return ", ".join(names) if len(names) <= limit else ", ".join(names[:limit - 1]) + f", ..., {names[-1]}"


def lines(d: dict) -> list[str]:
    """The description as the tool prints it."""
    m, lay, a = d["model"], d["layout"], d["args"]
    agg = m.get("aggregation")
    task = m.get("task") or "?"
    extra = [f"mask ratio {d['mask_ratio']}"] if d.get("mask_ratio") is not None else []
    if d.get("lead_time") is not None:
        extra.append(f"lead time {d['lead_time']}")
    if m.get("num_outputs"):
        extra.append(f"{m['num_outputs']} {'classes' if task == 'segment' else 'output maps'}")
    it = "iteration ?" if d.get("iteration") is None else f"iteration {d['iteration']:,}"
    if d.get("consumed_samples") is not None:
        it += f", {d['consumed_samples']:,} samples consumed"
    out = [f"{d['path']}: {d['kind']}, {it}",
           f"  task           {task}" + (f" ({', '.join(extra)})" if extra else "")]
    ffn = m.get("ffn_hidden_size") or (4 * m["hidden_size"] if m.get("hidden_size") else None)
    arch = (f"ViT {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, {m.get('num_attention_heads')} heads, "
            f"FFN {ffn}; channel aggregation {_AGGREGATIONS.get(agg, agg)}")
    if agg and agg != "flat":
        arch += f", G = {m.get('groups')} groups, {m.get('tree_levels') or 1} tree level(s)"
    if m.get("channel_embedding") and m["channel_embedding"] != "learned":
        arch += f"; channel embedding {m['channel_embedding']}"
    if d.get("parameters"):
        arch += f"; {d['parameters']:,} parameters"
    out.append(f"  architecture   {arch}")
    zero = lay.get("zero_stage")
    layout = (f"T = {lay.get('tensor_model_parallel_size')}, P = {lay.get('channel_parallel_size')}, "
              f"DP = {lay.get('data_parallel_size') or '?'}, ZeRO {zero if zero is not None else '?'}, "
              f"{'bf16' if lay.get('bf16') else 'fp32'}")
    if d["kind"] == "consolidated export":
        layout = f"trained at {layout}; the export is layout-free (fp32, any T and P)"
    out.append(f"  layout         {layout}")
    C = m.get("num_channels")
    names, wl = d.get("channel_names"), d.get("wavelengths")
    ch = f"{C}"
    if names:
        ch += f": {_names(names)}"
    known = [float(w) for w in (wl or []) if w is not None]
    if known:
        ch += f" ({min(known):g}-{max(known):g} nm, {len(known)} with a wavelength)"
    elif not names:
        ch += " (no names or wavelengths recorded: inputs are taken by position)"
    out.append(f"  channels       {ch}")
    if m.get("img_h"):
        p = m.get("patch_dim")
        out.append(f"  tile           {m['img_h']} x {m['img_w']} pixels, patches of {p} x {p} "
                   f"({m['img_h'] // p} x {m['img_w'] // p} tokens)")
    data = a.get("data_path")
    out.append(f"  data           {data if data else 'not recorded'}"
               + (f" (--data-format {a['data_format']})" if data and a.get("data_format") else ""))
    n = d.get("normalization") or {}
    if n.get("normalized") and n.get("mean") is not None:
        mean = [v for v in n["mean"] if v is not None]
        std = [v for v in n["std"] if v is not None]
        out.append(f"  normalization  per-channel mean/std of the training data: mean {min(mean):.4g}..{max(mean):.4g}, "
                   f"std {min(std):.4g}..{max(std):.4g}")
    elif n:
        out.append("  normalization  none (trained on raw values)")
    else:
        out.append("  normalization  not recorded")
    t = d.get("targets") or {}
    if t.get("names"):
        out.append(f"  targets        {_names(t['names'])}")
    out.append(f"  size on disk   {_human(d['size'])} in {d['files']} file(s)")
    return out
