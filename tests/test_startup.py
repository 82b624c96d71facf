"""Start-up: a wrong command fails before any process group exists, every problem at once; the
launcher's environment (torchrun, srun, none); DeepSpeed's JIT ops cached per environment; the
package whatever its clone is called; ``dchag.load_pretrained`` without the launcher machinery.

Times are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.distributed import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("torch", "deepspeed", "megatron")


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages a ``python -X importtime`` run imported."""
    out = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            out.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return out


def test_a_wrong_command_fails_before_torch_distributed_with_every_problem(tmp_path):
    """Rank 0 of a 2-rank job with no rank 1 anywhere: had it reached torch.distributed it would wait
    for its peer until the timeout. It exits 1 at once, naming all five problems, and imports
    neither torch, DeepSpeed nor megatron-core."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimisation": {"stage": 1}, "bf16": {"enabeld": False},
                              "train_micro_batch_size_per_gpu": 4}))
    argv = [sys.executable, "-X", "importtime", os.path.join(REPO, "pretrain_dchag.py"), "--deepspeed",
            "--deepspeed_config", str(ds), "--task", "mae", "--data-path", str(tmp_path / "missing.npy"),
            "--num-channels", "13", "--img-h", "8", "--img-w", "8", "--patch-dim", "3", "--train-iters", "2",
            "--micro-batch-size", "2", "--tensor-model-parallel-size", "4"]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
    seconds = time.perf_counter() - t0
    print(f"\nwrong command: exit {proc.returncode} after {seconds:.2f} s (no process group, no torch import)")
    err = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in err, err
    for words in (["world size 2", "--tensor-model-parallel-size 4"],  # the layout
                  ["unknown top-level key 'zero_optimisation'", "did you mean 'zero_optimization'"],  # JSON typos
                  ["unknown key bf16.enabeld", "did you mean 'enabled'"],
                  ["train_micro_batch_size_per_gpu=4", "--micro-batch-size 2"],  # JSON vs command line
                  ["missing.npy", "does not exist"],  # the data
                  ["--img-h 8 is not divisible by --patch-dim 3"]):  # the model
        assert all(w in err for w in words), (words, err)
    assert err.startswith("error: 6 problems, found before anything was started or written:"), err
    assert not set(HEAVY) & _imported(proc.stderr), sorted(set(HEAVY) & _imported(proc.stderr))


def test_a_finetune_is_checked_by_the_preflight_with_the_other_problems(tmp_path):
    """--finetune's problems (no --pretrained-checkpoint, a path that does not exist, an architecture
    that differs from the pretrained model's) are found by the pre-flight (which runs before any
    process group: the first test), listed with the others; with good input the flags not given
    come from the pretrained model. (The export is built here, in this process, which starts a
    one-rank group of its own.)"""
    from dchag.arguments import parse_args
    from dchag.checkpointing import consolidated
    from dchag.inference.runtime import build_serial_model
    from dchag.model.config import DChagConfig
    from dchag.training import entry, preflight
    cfg = DChagConfig(num_channels=3, img_h=8, img_w=8, patch_dim=2, hidden_size=16, num_layers=1,
                      num_attention_heads=2, aggregation="linear", groups=1)
    export = str(tmp_path / "export")
    consolidated.write(export, dict(build_serial_model(cfg).named_parameters()), {"model": consolidated.config_to_dict(cfg)})
    base = ["--task", "mae", "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "2", "--num-channels", "3"]
    missing = ["--data-path", str(tmp_path / "missing.npy")]
    for extra, words in ((["--finetune"], "--finetune needs --pretrained-checkpoint"),
                         (["--finetune", "--pretrained-checkpoint", str(tmp_path / "nowhere")], "does not exist"),
                         (["--finetune", "--pretrained-checkpoint", export, "--hidden-size", "32"],
                          "--hidden-size 32 (pretrained: 16)")):
        with pytest.raises(preflight.PreflightError) as e:
            preflight.run(parse_args(base + missing + extra), world=1)
        assert words in str(e.value) and "missing.npy" in str(e.value), (words, str(e.value))
    np.save(tmp_path / "cube.npy", np.zeros((3, 8, 8), np.float32))
    data = ["--data-path", str(tmp_path / "cube.npy")]
    with pytest.raises(entry._user_errors(), match="--finetune needs --pretrained-checkpoint"):  # one problem: exit 1
        preflight.run(parse_args(base + data + ["--finetune"]), world=1)
    found = preflight.run(parse_args(base + data + ["--finetune", "--pretrained-checkpoint", export]), world=1)
    assert found.pretrained is not None and (found.cfg.hidden_size, found.cfg.num_layers) == (16, 1)  # not given


def test_the_preflight_checks_save_without_taking_the_lock_or_moving_anything(tmp_path):
    """The pre-flight refuses a --save another live job holds, but takes no lock and moves no
    interrupted save aside: both are the run's, after the pre-flight (a folder another job is
    still writing has no manifest either)."""
    import json as _json

    from dchag.arguments import parse_args
    from dchag.checkpointing import lock
    from dchag.checkpointing.errors import CheckpointError
    from dchag.training import preflight
    save = tmp_path / "run"
    (save / "iter_0000005").mkdir(parents=True)  # an interrupted save: no manifest
    np.save(tmp_path / "cube.npy", np.zeros((3, 8, 8), np.float32))
    argv = ["--task", "mae", "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "2",
            "--num-channels", "3", "--data-path", str(tmp_path / "cube.npy"), "--save", str(save)]
    owner = dict(lock.owner_record(), pid=os.getppid(), proc_start=lock._proc_start(os.getppid()), job={})
    (save / lock.LOCK).write_text(_json.dumps(owner))  # a live process of another job
    with pytest.raises(CheckpointError, match="in use by another job"):
        preflight.run(parse_args(argv), world=1)
    (save / lock.LOCK).unlink()
    preflight.run(parse_args(argv), world=1)
    assert sorted(os.listdir(save)) == ["iter_0000005"]  # no lock taken, nothing moved aside


def test_a_dense_task_is_checked_by_the_preflight(tmp_path):
    """--task regress / segment: the task's own check (its targets, --num-classes) runs in the
    pre-flight, listed with the others, and no model problem follows from a head size it could not
    read; --target-path given to a task that reads none is refused there too."""
    from dchag.arguments import parse_args
    from dchag.training import preflight
    np.save(tmp_path / "cube.npy", np.zeros((3, 8, 8), np.float32))
    base = ["--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "2", "--num-channels", "3",
            "--data-path", str(tmp_path / "cube.npy"), "--tensor-model-parallel-size", "4"]
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(parse_args(base + ["--task", "regress"]), world=2)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 2 and "--task regress needs --target-path" in str(e.value) and "world size 2" in str(e.value), lines
    with pytest.raises(preflight.PreflightError, match="read by --task regress and segment only"):
        preflight.run(parse_args(base + ["--task", "mae", "--target-path", str(tmp_path / "t.npy")]), world=2)


def test_deepspeed_json_lists_every_problem_at_once():
    from dchag.training.ds_validate import ConfigError, validate
    cfg = {"zero_optimisation": {}, "zero_optimization": {"stgae": 1, "offload_optimizer": {"devcie": "cpu"},
                                                          "reduce_bucket_size": "big"},
           "tensorboard": {"output_pth": "tb"}}
    with pytest.raises(ConfigError) as e:
        validate(cfg, "my.json")
    lines = str(e.value).splitlines()
    assert len(lines) == len(e.value.problems) == 5, lines
    for want in ("unknown top-level key 'zero_optimisation'", "unknown key zero_optimization.stgae; did you mean 'stage'",
                 "unknown key zero_optimization.offload_optimizer.devcie; did you mean 'device'",
                 "unknown key tensorboard.output_pth; did you mean 'output_path'",
                 "zero_optimization.reduce_bucket_size = 'big'"):
        assert sum(want in ln for ln in lines) == 1, (want, lines)


def test_the_key_snapshot_is_the_installed_deepspeeds():
    """The pre-flight checks keys without importing DeepSpeed, from dchag/training/ds_keys.py: it
    must be what the installed DeepSpeed's models accept (regenerate it after an upgrade)."""
    import deepspeed
    from dchag.training import ds_keys
    from dchag.training.ds_validate import section_keys_from_deepspeed
    assert ds_keys.DEEPSPEED_VERSION == deepspeed.__version__
    assert ds_keys.SECTION_KEYS == section_keys_from_deepspeed()


@pytest.mark.parametrize("nodelist, host", [("node[003-008,010],gpu1", "node003"), ("gpu17", "gpu17"),
                                            ("a1,a2", "a1"), ("rack[1-2]-n[07-09]", "rack1-n07"),
                                            ("x[0042]", "x0042")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    from dchag.training.launch import first_host
    assert first_host(nodelist) == host


def test_launch_environment_from_srun_torchrun_or_none():
    from dchag.training.launch import LaunchError, port_for_job, resolve
    srun = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
            "SLURM_JOB_NODELIST": "gpu[07-08]"}
    env = dict(srun)
    got = resolve(env)
    assert (got["launcher"], got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("srun", 3, 8, 1)
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 123456 % 10000) == "23456"
    assert port_for_job("123456") == 23456
    env = dict(srun, MASTER_ADDR="10.0.0.1", MASTER_PORT="4242")  # set by the user: used as given
    resolve(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["RANK"]) == ("10.0.0.1", "4242", "3")
    torchrun = dict(srun, RANK="5", WORLD_SIZE="16", LOCAL_RANK="5", MASTER_ADDR="h", MASTER_PORT="1")  # srun torchrun
    got = resolve(torchrun)
    assert (got["launcher"], got["RANK"], got["WORLD_SIZE"], got["LOCAL_RANK"]) == ("env", 5, 16, 5)
    got = resolve({})
    assert (got["launcher"], got["RANK"], got["WORLD_SIZE"], got["MASTER_ADDR"]) == ("single", 0, 1, "127.0.0.1")
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        resolve({k: v for k, v in srun.items() if k != "SLURM_JOB_NODELIST"})
    with pytest.raises(LaunchError, match="RANK=8 is not a rank of WORLD_SIZE=8"):
        resolve(dict(srun, SLURM_PROCID="8"))


def test_jit_ops_are_cached_in_the_environment(monkeypatch, tmp_path):
    from dchag.training.launch import use_environment_extensions_dir
    env = {}
    assert use_environment_extensions_dir(env) == os.path.join(sys.prefix, "torch_extensions")
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}  # the user's choice stands
    assert use_environment_extensions_dir(env) == str(tmp_path)


def test_a_bare_json_list_in_the_channel_sidecar_is_the_channel_names(tmp_path):
    from dchag.data.errors import DataError
    from dchag.data.readers import open_source
    np.save(tmp_path / "cube.npy", np.zeros((3, 4, 4), np.float32))
    (tmp_path / "cube.channels.json").write_text(json.dumps(["red", "green", "blue"]))
    assert open_source(str(tmp_path / "cube.npy")).channel_names == ["red", "green", "blue"]
    (tmp_path / "cube.channels.json").write_text(json.dumps([650.0, 550.0, 450.0]))
    with pytest.raises(DataError, match="wavelengths"):
        open_source(str(tmp_path / "cube.npy"))


def test_the_package_imports_beside_a_folder_named_dchag(tmp_path):
    """A clone named ``dchag`` beside the user's script (a folder without ``__init__.py`` on the
    script's path) must not shadow the installed package."""
    (tmp_path / "dchag").mkdir()
    (tmp_path / "use.py").write_text("import dchag\nprint(dchag.__file__, callable(dchag.load_pretrained))\n")
    proc = subprocess.run([sys.executable, "use.py"], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [os.path.join(REPO, "dchag", "__init__.py"), "True"], proc.stdout


EXPORT_AND_LOAD = """
import sys, time
t0 = time.perf_counter()
from dchag.checkpointing import consolidated
from dchag.inference.runtime import build_serial_model
from dchag.model.config import DChagConfig
cfg = DChagConfig(num_channels=13, img_h=8, img_w=8, patch_dim=2, hidden_size=32, num_layers=2, num_attention_heads=4,
                  aggregation="linear", groups=4)
model = build_serial_model(cfg)
consolidated.write(sys.argv[1], dict(model.named_parameters()), {"model": consolidated.config_to_dict(cfg)})
t1 = time.perf_counter()
import dchag
loaded = dchag.load_pretrained(sys.argv[1], device="cpu")
t2 = time.perf_counter()
x = __import__("numpy").ones((1, 13, 8, 8), "float32")
assert loaded.reconstruct(x, mask_ratio=0.5).shape == (1, 13, 8, 8)
launcher = ("deepspeed", "torch.distributed.run", "torch.distributed.launcher", "dchag.training.loop",
            "dchag.training.entry", "torch._dynamo", "torch._inductor")
print(t1 - t0, t2 - t1, [m for m in launcher if m in sys.modules])
"""


def test_load_pretrained_imports_no_launcher_machinery(tmp_path):
    """Exporting a model and loading it with ``dchag.load_pretrained`` imports neither DeepSpeed,
    torch's launcher nor the training loop (nor torch.compile's machinery on the CPU). One process
    does both (the first import is the export's); docs/BENCHMARKS.md section 7 times a fresh load."""
    export = str(tmp_path / "export")
    proc = subprocess.run([sys.executable, "-c", EXPORT_AND_LOAD, export], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    build, load, loaded = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    print(f"\nimports + serial model + export: {float(build):.2f} s; load_pretrained after them: {float(load):.2f} s")
    assert loaded == "[]", loaded


# ----------------------------------------------------------------------------------------------
# issue 30: absurd sizes refused by the pre-flight; every cheap mistake found before the heavy imports


def _preflight_only(argv, tmp_path, env=None, preexec_fn=None):
    """``pretrain_dchag.py argv`` as a one-rank job under ``python -X importtime``: (exit status,
    stderr without the import lines, seconds, heavy packages imported)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(REPO, "pretrain_dchag.py")] + argv,
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300, preexec_fn=preexec_fn,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})})
    seconds = time.perf_counter() - t0
    err = "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    return proc.returncode, err, seconds, sorted(set(HEAVY) & _imported(proc.stderr))


def _address_space_8gb():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, resource.RLIM_INFINITY))  # a memory limit, as the issue's


SMALL = ["--task", "mae", "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "2"]


@pytest.mark.parametrize("flags, part", [
    (["--micro-batch-size", "1e9", "--global-batch-size", "1e9"], "the input micro-batch, 960.0 GB: lower "
                                                                  "--micro-batch-size 1000000000"),
    (["--hidden-size", "10000000"], "lower --hidden-size 10000000 or --num-layers 2"),
    (["--num-layers", "1000000"], "lower --hidden-size 64 or --num-layers 1000000"),
    (["--data-path", "synthetic", "--num-channels", "1000000"], "per-channel weights: lower --num-channels 1000000"),
], ids=["batch-1e9", "hidden-1e7", "layers-1e6", "channels-1e6"])
def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path, flags, part):
    """Issue 30: a batch of 10^9 spun over 300 s; hidden size 10^7, 10^6 layers and 10^6 channels ended
    in the allocator's RuntimeError/MemoryError after 15-119 s (under a memory limit). The pre-flight's
    memory check (the planner's per-rank estimate against the memory here; here: an 8 GB address-space
    limit) refuses each before torch is imported, naming the figure and the flag; "1e9" is an integer."""
    np.save(tmp_path / "cube.npy", np.zeros((4, 3, 16, 16), np.float32))
    argv = SMALL + ["--data-path", str(tmp_path / "cube.npy"), "--num-channels", "3"] + flags
    code, err, seconds, heavy = _preflight_only(argv, tmp_path, preexec_fn=_address_space_8gb)
    print(f"\n{' '.join(flags)}: exit {code} after {seconds:.2f} s")
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert err.startswith("error: the run does not fit the memory here: each rank needs about "), err
    assert "this process's memory limit (ulimit -v 8388608) is 8.6 GB" in err and part in err, err
    assert "Nothing was allocated" in err and "--skip-memory-check starts anyway" in err, err
    assert not heavy, heavy


def test_the_memory_check_asks_the_gpu_on_a_gpu_run_and_can_be_skipped(tmp_path, monkeypatch):
    """On a GPU run the estimate is held against the GPU's memory (read without CUDA: NVML or the
    amdgpu driver; here a stand-in), one rank per GPU; a run that fits passes; --skip-memory-check
    passes whatever the estimate says."""
    from dchag.arguments import parse_args
    from dchag.training import memory_fit, preflight
    np.save(tmp_path / "cube.npy", np.zeros((4, 3, 16, 16), np.float32))
    base = SMALL + ["--data-path", str(tmp_path / "cube.npy"), "--num-channels", "3", "--hidden-size", "4096",
                    "--num-attention-heads", "32", "--num-layers", "8"]  # 1.6e9 parameters: ~26 GB of model states
    monkeypatch.setattr(memory_fit, "gpu_memory", lambda: (int(80e9), "the GPU's memory (NVML)"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # GPUs are not shared between the ranks of a node
    preflight.run(parse_args(base), world=1)
    monkeypatch.setattr(memory_fit, "gpu_memory", lambda: (int(16e9), "the GPU's memory (NVML)"))
    with pytest.raises(preflight.ConfigError, match=r"each rank needs about 2[0-9].\d GB at least, but the GPU's memory "
                                                    r"\(NVML\) is 16.0 GB \(0.5 GB"):
        preflight.run(parse_args(base), world=1)
    preflight.run(parse_args(base + ["--skip-memory-check"]), world=1)


def test_cheap_mistakes_are_reported_before_the_heavy_imports(tmp_path):
    """Issue 30: with data that opens, a DeepSpeed JSON typo, a layout that does not divide the world
    and a --save that cannot be written were reported after torch and megatron-core were imported (the
    task's flag check imported them; the unwritable --save was found only when the run took the lock):
    7-10 s on an idle machine. Now all three are listed at once, and a --load that does not exist, with
    none of torch, DeepSpeed or megatron-core imported (timings printed: docs/BENCHMARKS.md section 7)."""
    np.save(tmp_path / "cube.npy", np.zeros((4, 3, 16, 16), np.float32))
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimisation": {"stage": 1}}))
    (tmp_path / "a-file").write_text("")
    base = SMALL + ["--data-path", str(tmp_path / "cube.npy"), "--num-channels", "3"]
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    code, err, seconds, heavy = _preflight_only(base + ["--deepspeed", "--deepspeed_config", str(ds), "--save",
                                                        str(tmp_path / "a-file"), "--tensor-model-parallel-size", "3"],
                                                tmp_path, env)
    print(f"\nJSON typo + layout + --save a file: exit {code} after {seconds:.2f} s")
    assert code == 1 and err.startswith("error: 4 problems"), err
    for words in ("unknown top-level key 'zero_optimisation'", "world size 2 is not divisible by "
                  "--tensor-model-parallel-size 3", f"--save {tmp_path}/a-file is a file, not a folder"):
        assert words in err, (words, err)
    assert not heavy, heavy
    code, err, seconds, heavy = _preflight_only(base + ["--load", str(tmp_path / "nowhere")], tmp_path)
    print(f"--load of a missing folder: exit {code} after {seconds:.2f} s")
    assert code == 1 and f"--load {tmp_path}/nowhere: folder does not exist" in err and not heavy, (err, heavy)
    code, err, seconds, heavy = _preflight_only(base + ["--save", "/proc/self/run"], tmp_path)
    print(f"--save where nothing can be written: exit {code} after {seconds:.2f} s")
    assert code == 1 and "cannot create --save /proc/self/run: this job may not create folders in /proc/self " \
                         "(permission denied)" in err, err
    assert not heavy, heavy
