"""A LoRA fine-tune exported apart from its base, and merged back.

    tools/convert_checkpoint.py --load-dir RUN --save-dir OUT --format consolidated --adapters apart
    -> OUT/adapters.safetensors   what the run trained: the adapters (<linear>.lora.A/.B), the head and
                                  the task's conditioning, the tensors the fine-tune made new or
                                  interpolated; whole, fp32 (a small file: the base is not in it)
       OUT/config.json            format "dchag-lora-adapters": the export's fields (model with its LoRA,
                                  normalization, channel identity, task) and "base": the pretrained
                                  checkpoint the fine-tune started from (--pretrained-checkpoint, resolved)
                                  with the SHA-256 of its manifest, and how its channels were matched

    tools/convert_checkpoint.py --load-dir OUT --save-dir FULL --format consolidated
    -> FULL: the consolidated export with the adapters merged (as ``--adapters merge`` writes it from the
       run): the base is read again, the fine-tune's transfer replayed for the frozen tensors
       (dchag/transfer: the same plan, so the same values), the trained tensors put over them.

A base that changed since (another manifest) is refused: the adapters were trained on it.
"""

from __future__ import annotations

import json
import os

import torch

from dchag.checkpointing import consolidated, manifest
from dchag.checkpointing.errors import CheckpointError

FORMAT = "dchag-lora-adapters"
WEIGHTS = "adapters.safetensors"


def is_apart(path: str) -> bool:
    try:
        with open(os.path.join(path, consolidated.CONFIG)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _fingerprint(folder: str) -> str:
    path = os.path.join(folder, manifest.MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no {manifest.MANIFEST}: the base of an adapters-apart export must carry "
                              "one (its checksum is how a changed base is found).")
    return manifest.sha256_file(path)


def export_apart(load_dir: str, save_dir: str) -> dict:
    """OUT/adapters.safetensors + OUT/config.json of a LoRA run (module docstring); returns the config."""
    from safetensors.torch import save_file
    from dchag.checkpointing.convert import consolidate
    from dchag.transfer.pretrained import open_pretrained
    consolidated.check_output(save_dir)
    tensors, config = consolidate(load_dir, merge_adapters=False)
    lora, args = config["source"].get("lora"), config["training_args"]
    if not lora:
        raise CheckpointError(f"{load_dir} was not trained with --lora-rank: it has no adapters to write apart; export it "
                              "whole (--adapters merge, the default).")
    frozen = config["source"].get("frozen_parameters")
    base = args.get("pretrained_checkpoint")
    if frozen is None or not base:
        raise CheckpointError(f"{load_dir} does not record its frozen parameters or its base (saved by an older "
                              "version?); export it whole (--adapters merge).")
    if not os.path.exists(base):
        raise CheckpointError(f"the base of {load_dir}, --pretrained-checkpoint {base}, is not found from here (a path "
                              "relative to the training run's folder?); run the export from there, or export whole "
                              "(--adapters merge).")
    pretrained = open_pretrained(base)
    trained = {n: t for n, t in tensors.items() if n not in set(frozen)}
    config = {**config, "format": FORMAT, "version": 1,
              "base": {"path": os.path.abspath(pretrained.folder), "manifest_sha256": _fingerprint(pretrained.folder),
                       "match_channels": args.get("match_channels")},
              "adapters_file": WEIGHTS, "frozen_parameters": list(frozen)}
    with consolidated.staged_output(save_dir) as tmp:
        save_file({k: v.detach().float().contiguous() for k, v in sorted(trained.items())}, os.path.join(tmp, WEIGHTS),
                  metadata={"format": "pt", "producer": FORMAT})
        with open(os.path.join(tmp, consolidated.CONFIG), "w") as f:
            json.dump(config, f, indent=1)
            f.write("\n")
        manifest.write_manifest(tmp)
    print(f"> wrote {save_dir}/{WEIGHTS} ({len(trained)} trained tensors, {sum(t.numel() for t in trained.values()):,} "
          f"values; {len(frozen)} frozen tensors stay in the base {config['base']['path']}) and {consolidated.CONFIG}",
          flush=True)
    return config


def merge_apart(apart_dir: str, save_dir: str) -> dict:
    """The consolidated export (adapters merged) of an adapters-apart export and its base."""
    from safetensors.torch import load_file
    from dchag.inference.runtime import build_serial_model
    from dchag.model.lora import merge, spec_of
    from dchag.parallel.state_dict import full_state_dict
    from dchag.transfer import plan_for
    from dchag.transfer.load import copy_into
    from dchag.transfer.pretrained import open_pretrained
    consolidated.check_output(save_dir)
    manifest.raise_problems(apart_dir, manifest.verify(apart_dir, require=True), "Write the export again.")
    with open(os.path.join(apart_dir, consolidated.CONFIG)) as f:
        config = json.load(f)
    base = config["base"]
    if not os.path.exists(base["path"]):
        raise CheckpointError(f"the base of {apart_dir}, {base['path']}, is not found; the adapters need it.")
    if _fingerprint(base["path"]) != base["manifest_sha256"]:
        raise CheckpointError(f"the base of {apart_dir}, {base['path']}, changed since the adapters were trained on it "
                              "(its manifest differs); merge them with the base they were trained on.")
    cfg = consolidated.config_from_dict(config["model"], bf16=False, sequence_parallel=False,
                                        recompute_activations=False)
    pretrained = open_pretrained(base["path"])
    trained = load_file(os.path.join(apart_dir, config["adapters_file"]))
    with torch.random.fork_rng(devices=[]):
        model = build_serial_model(cfg)
    copy_into(model, plan_for(model, pretrained, base.get("match_channels")), pretrained.tensors())
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(trained) - set(config["frozen_parameters"]))
    if missing:
        raise CheckpointError(f"{apart_dir}/{config['adapters_file']} lacks {len(missing)} trained tensor(s), e.g. "
                              f"{missing[:3]}; write the export again.")
    with torch.no_grad():
        for name, t in trained.items():
            params[name].copy_(t)
    tensors = merge(full_state_dict(model), spec_of(cfg))
    import dataclasses
    plain = dataclasses.replace(cfg, lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_targets=None)
    out = {k: v for k, v in config.items() if k not in ("format", "version", "base", "adapters_file",
                                                         "frozen_parameters")}
    out["model"] = consolidated.config_to_dict(plain)
    out["parameters"] = {n: s for n, s in config["parameters"].items() if n in tensors}
    out["source"] = {**config["source"], "lora": {**config["source"]["lora"], "merged": True},
                     "adapters_apart": os.path.abspath(apart_dir)}
    consolidated.write(save_dir, tensors, out)
    print(f"> wrote {save_dir}: {apart_dir}'s adapters merged into its base {base['path']} ({len(tensors)} tensors)",
          flush=True)
    return out
