import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _each_module_ends_without_a_process_group():
    """``dchag.load_pretrained`` runs in a one-rank gloo group it leaves up (a notebook keeps using
    it); a later module that needs a process of its own (tests/test_sim.py: fake-tensor simulation)
    would find it. Each module ends as it began: without a process group in this process."""
    yield
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()
