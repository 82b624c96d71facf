"""A CPU start builds no DeepSpeed JIT op, so a build lock left by a killed process cannot hang it.

A process killed while DeepSpeed JIT-built its CPU shared-memory op left torch's build lock in the
extension cache; every later start waited on that lock forever (CI hung 30 min). The start must now
skip that op: with a stale lock planted in a fresh extension cache, it returns, and builds nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

from tests.distributed import free_port

_START = """
import os, torch.distributed as dist
from dchag.training.initialize import init_distributed
init_distributed()
assert dist.is_initialized() and dist.get_backend() == "gloo", dist.get_backend()
dist.destroy_process_group()
print("started")
"""


def test_cpu_start_ignores_a_stale_jit_build_lock(tmp_path):
    cache = tmp_path / "torch_extensions"
    op_dir = cache / "deepspeed_shm_comm"  # torch's folder for the op under TORCH_EXTENSIONS_DIR
    op_dir.mkdir(parents=True)
    (op_dir / "lock").write_text("")  # what a process killed mid-build leaves behind
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(cache), DS_ACCELERATOR="cpu", RANK="0",
               WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    done = subprocess.run([sys.executable, "-c", _START], env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started" in done.stdout
    built = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())
    assert built == ["deepspeed_shm_comm/lock"], f"a DeepSpeed op was built at start: {built}"
