"""Where this process sits in the job, from whichever launcher started it (imports no torch).

torch.distributed reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`resolve` fills them, in this order:

1. set already (torchrun, the ``deepspeed`` launcher, a test harness): used as they are;
2. SLURM's ``srun`` with one task per GPU and no launcher: ``SLURM_PROCID`` -> ``RANK``,
   ``SLURM_NTASKS`` -> ``WORLD_SIZE``, ``SLURM_LOCALID`` -> ``LOCAL_RANK``; ``MASTER_ADDR`` /
   ``MASTER_PORT`` when set, else the first host of ``SLURM_JOB_NODELIST`` and a port derived from
   ``SLURM_JOB_ID`` (every task of the job computes the same one);
3. neither: one process, rank 0 of 1, on 127.0.0.1:29500.

It also gives DeepSpeed's JIT-compiled ops (the CPU communication op is built on the first
start) a cache of their own per Python environment (:func:`use_environment_extensions_dir`):
torch's default, ``~/.cache/torch_extensions``, is shared by every environment of the user, and two
environments with different DeepSpeed sources rebuild each other's op on every start (1-3 minutes).
"""

from __future__ import annotations

import os
import sys

DEFAULT_PORT = 29500
PORT_BASE, PORT_SPAN = 20000, 10000  # srun without MASTER_PORT: 20000 + job id mod 10000 (below the ephemeral range)


class LaunchError(RuntimeError):
    """The launcher's environment is inconsistent; the message names the variable and the fix."""


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``node[003-008,010],gpu1`` -> ``node003``,
    ``rack[1-2]-n[07-09]`` -> ``rack1-n07`` (each bracket contributes its first value, zero
    padding kept)."""
    out, i = [], 0
    nodelist = nodelist.strip()
    while i < len(nodelist) and nodelist[i] != ",":
        if nodelist[i] == "[":
            end = nodelist.find("]", i)
            if end < 0:
                raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced '['; set MASTER_ADDR to the first "
                                  "node's address.")
            out.append(nodelist[i + 1:end].split(",")[0].split("-")[0])
            i = end + 1
        else:
            out.append(nodelist[i])
            i += 1
    host = "".join(out)
    if not host:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} names no host; set MASTER_ADDR to the first node's address.")
    return host


def port_for_job(job_id: str) -> int:
    if not str(job_id).isdigit():
        raise LaunchError(f"SLURM_JOB_ID={job_id!r} is not a number; set MASTER_PORT.")
    return PORT_BASE + int(job_id) % PORT_SPAN


def _int(environ, name: str) -> int:
    value = environ.get(name, "")
    if not value.strip().isdigit():
        raise LaunchError(f"{name}={value!r} is not a non-negative integer; check the launcher's environment.")
    return int(value)


def launcher(environ=None) -> str:
    """'env' (RANK set by a launcher), 'srun' (SLURM task variables only) or 'single'."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return "env"
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return "srun"
    return "single"


def resolve(environ=None) -> dict:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``environ`` (default
    ``os.environ``) from the launcher's variables; returns them (ints for the first three)."""
    environ = os.environ if environ is None else environ
    kind = launcher(environ)
    if kind == "srun":
        environ["RANK"] = str(_int(environ, "SLURM_PROCID"))
        environ["WORLD_SIZE"] = str(_int(environ, "SLURM_NTASKS"))
        environ["LOCAL_RANK"] = str(_int(environ, "SLURM_LOCALID")) if "SLURM_LOCALID" in environ else "0"
        if "MASTER_ADDR" not in environ:
            nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
            if not nodelist:
                raise LaunchError("srun task without MASTER_ADDR or SLURM_JOB_NODELIST: set MASTER_ADDR to the first "
                                  "node's address.")
            environ["MASTER_ADDR"] = first_host(nodelist)
        if "MASTER_PORT" not in environ:
            if "SLURM_JOB_ID" not in environ:
                raise LaunchError("srun task without MASTER_PORT or SLURM_JOB_ID: set MASTER_PORT.")
            environ["MASTER_PORT"] = str(port_for_job(environ["SLURM_JOB_ID"]))
    environ.setdefault("RANK", "0")
    environ.setdefault("WORLD_SIZE", "1")
    environ.setdefault("LOCAL_RANK", "0")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
    rank, world, local = (_int(environ, k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not 0 <= rank < world:
        raise LaunchError(f"RANK={rank} is not a rank of WORLD_SIZE={world}; check the launcher's environment.")
    return {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "MASTER_ADDR": environ["MASTER_ADDR"],
            "MASTER_PORT": environ["MASTER_PORT"], "launcher": kind}


def environment_extensions_dir() -> str | None:
    """``<environment>/torch_extensions`` (the virtual environment's folder), or None when the
    environment's folder is not writable (a system Python: torch's default stays)."""
    prefix = sys.prefix
    return os.path.join(prefix, "torch_extensions") if os.access(prefix, os.W_OK) else None


def use_environment_extensions_dir(environ=None) -> str | None:
    """Point ``TORCH_EXTENSIONS_DIR`` at this environment's cache unless the user set it. Must run
    before DeepSpeed builds an op (``init_distributed`` does)."""
    environ = os.environ if environ is None else environ
    if "TORCH_EXTENSIONS_DIR" not in environ:
        folder = environment_extensions_dir()
        if folder:
            environ["TORCH_EXTENSIONS_DIR"] = folder
    return environ.get("TORCH_EXTENSIONS_DIR")
