"""megatron-core on a CPU-only torch build, after ``megatron_patches.cpu.apply_cpu_patches()``.

One 2-rank gloo run (module fixture) builds megatron's TransformerBlock (local spec, no attention
mask: a ViT) at TP=1 and TP=2 and records numbers; the tests below compare them:

* TP=2 shards are slices of the TP=1 weights (use_cpu_initialization + same seed);
* TP=2 forward and all gathered parameter grads equal TP=1, without and with sequence parallel
  (SP-replicated params, tagged ``sequence_parallel=True``, all-reduced over TP);
* full/uniform activation recompute gives the same output and grads;
* with dropout: the forward is reproducible from ``model_parallel_cuda_manual_seed``, recompute
  replays the same dropout masks, and the model-parallel RNG stream is per TP rank.
"""

from __future__ import annotations

import copy
import traceback

import pytest
import torch

from megatron_patches import cpu as cpu_patches
from tests.distributed import run_distributed

SEQ, BATCH, HIDDEN, HEADS, LAYERS, FFN = 8, 2, 32, 4, 2, 64
WEIGHT_SEED = 1234
DATA_SEED = 99
DROPOUT_SEED = 7
RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------
# worker side (runs in each spawned gloo rank)
# ----------------------------------------------------------------------------------------------


def _block(tp, sp=False, recompute=False, dropout=0.0, distribute_saved_activations=False):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_block import TransformerBlock
    from megatron.core.transformer.transformer_config import TransformerConfig

    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    extra = {}
    if recompute:
        extra = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
                     distribute_saved_activations=distribute_saved_activations)
    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=HEADS,
        ffn_hidden_size=FFN,
        tensor_model_parallel_size=tp,
        sequence_parallel=sp,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        params_dtype=torch.float32,
        **extra,
        **cpu_patches.cpu_transformer_config_overrides(),
    )
    from megatron.core import tensor_parallel

    # the RNG tracker must be seeded before any forward (attention dropout always forks it,
    # even with p=0); on CPU this also reseeds the global generator, so seed weights after it
    tensor_parallel.model_parallel_cuda_manual_seed(DROPOUT_SEED)
    torch.manual_seed(WEIGHT_SEED)  # master weights are drawn from the global RNG, then split
    return TransformerBlock(config, spec, post_layer_norm=True)


def _data():
    g = torch.Generator().manual_seed(DATA_SEED)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=g)  # megatron layout: [s, b, h]
    w = torch.randn(SEQ, BATCH, HIDDEN, generator=g)  # loss = sum(out * w): non-trivial grads
    return x, w


def _shard_seq(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n].contiguous()


def _fwd_bwd(block, sp, tp_rank, tp):
    """Forward + backward on the fixed batch; returns (full output, {name: grad}, grad_fn name)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    x, w = _data()
    if sp:
        x, w = _shard_seq(x, tp_rank, tp), _shard_seq(w, tp_rank, tp)
    x = x.clone().requires_grad_(True)
    out = block(hidden_states=x, attention_mask=None)
    grad_fn = "CheckpointFunctionBackward" if _uses_checkpoint(out) else "no checkpoint"
    (out * w).sum().backward()
    if sp:
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.detach().contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        out_full = torch.cat(parts, dim=0)
    else:
        out_full = out.detach().clone()
    grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
    return out_full, grads, grad_fn


def _uses_checkpoint(out):
    """Whether megatron's CheckpointFunction (activation recompute) is in the autograd graph."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


def _full_grads(block, grads, tp):
    """Reassemble TP=1-equivalent grads: gather TP shards, sum SP-replicated params over TP."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    full, sp_partial = {}, {}
    for name, p in block.named_parameters():
        g = grads[name]
        if getattr(p, "tensor_model_parallel", False):
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=group)
            full[name] = torch.cat(parts, dim=p.partition_dim)
        elif getattr(p, "sequence_parallel", False):
            sp_partial[name] = g.clone()
            g = g.clone()
            dist.all_reduce(g, group=group)
            full[name] = g
        else:
            full[name] = g
    return full, sp_partial


def _shard_info(block):
    return {n: (bool(getattr(p, "tensor_model_parallel", False)), int(getattr(p, "partition_dim", -1)),
                bool(getattr(p, "sequence_parallel", False)), p.detach().clone())
            for n, p in block.named_parameters()}


def _tracker_draws(seed):
    """Draws from the default stream and the forked model-parallel stream."""
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        mp_a = torch.rand(6)
    default_a = torch.rand(6)
    with tracker.fork():
        mp_b = torch.rand(6)  # continues the model-parallel stream
    default_b = torch.rand(6)  # continues the default stream, untouched by the forks
    return dict(mp=torch.cat([mp_a, mp_b]), default=torch.cat([default_a, default_b]))


def _dropout_run(tp, tp_rank, sp, recompute, seed):
    from megatron.core import tensor_parallel

    block = _block(tp, sp=sp, recompute=recompute, dropout=0.1)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)  # after construction: reseeds CPU RNG
    out, grads, grad_fn = _fwd_bwd(block, sp, tp_rank, tp)
    full, _ = _full_grads(block, grads, tp)
    return out, full, grad_fn


def _worker(ckpt_dir):
    import torch.distributed as dist

    cpu_patches.apply_cpu_patches()
    cpu_patches.apply_cpu_patches()  # idempotent
    from megatron.core import dist_checkpointing, parallel_state

    res = {"errors": {}}

    def step(name, fn):
        try:
            res[name] = fn()
        except Exception:  # recorded and shown by the test that needs this case
            res["errors"][name] = traceback.format_exc()

    world = dist.get_world_size()

    # ---- TP=1 reference (every rank builds the whole model) ---------------------------------
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)

    def reference():
        block = _block(1)
        out, grads, _ = _fwd_bwd(block, False, 0, 1)
        return dict(out=out, grads=grads, weights={n: p.detach().clone() for n, p in block.named_parameters()})

    step("ref", reference)
    step("tracker_tp1", lambda: _tracker_draws(DROPOUT_SEED))
    parallel_state.destroy_model_parallel()

    # ---- TP=2 -------------------------------------------------------------------------------
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    res["tp_rank"] = tp_rank

    def tp_case(sp, recompute, distribute=False):
        def run():
            block = _block(world, sp=sp, recompute=recompute, distribute_saved_activations=distribute)
            info = _shard_info(block)
            out, grads, grad_fn = _fwd_bwd(block, sp, tp_rank, world)
            full, sp_partial = _full_grads(block, grads, world)
            return dict(shards=info, out=out, grads=full, sp_partial=sp_partial, grad_fn=grad_fn)
        return run

    step("tp2", tp_case(sp=False, recompute=False))
    step("tp2_sp", tp_case(sp=True, recompute=False))
    step("tp2_recompute", tp_case(sp=False, recompute=True))
    step("tp2_sp_recompute", tp_case(sp=True, recompute=True))
    # checkpointed inputs split across TP ranks (megatron allows it only without SP)
    step("tp2_recompute_distributed", tp_case(sp=False, recompute=True, distribute=True))

    step("tracker_tp2", lambda: _tracker_draws(DROPOUT_SEED))

    for sp in (False, True):
        tag = "sp" if sp else "nosp"
        step(f"drop_{tag}", lambda sp=sp: _dropout_run(world, tp_rank, sp, False, DROPOUT_SEED))
        step(f"drop_{tag}_again", lambda sp=sp: _dropout_run(world, tp_rank, sp, False, DROPOUT_SEED))
        step(f"drop_{tag}_other_seed", lambda sp=sp: _dropout_run(world, tp_rank, sp, False, DROPOUT_SEED + 1))
        step(f"drop_{tag}_recompute", lambda sp=sp: _dropout_run(world, tp_rank, sp, True, DROPOUT_SEED))

    # ---- dist_checkpointing save -> load at TP=2 ---------------------------------------------
    def checkpoint():
        block = _block(world, sp=True)
        dist_checkpointing.save(block.sharded_state_dict(), ckpt_dir)
        saved = {n: p.detach().clone() for n, p in block.named_parameters()}
        other = _block(world, sp=True)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(1.0)
        state = dist_checkpointing.load(other.sharded_state_dict(), ckpt_dir)
        other.load_state_dict(state)
        loaded = {n: p.detach().clone() for n, p in other.named_parameters()}
        return dict(saved=saved, loaded=loaded)

    step("ckpt", checkpoint)
    parallel_state.destroy_model_parallel()
    return res


# ----------------------------------------------------------------------------------------------
# pytest side
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("mcore_ckpt"))
    return run_distributed(_worker, 2, ckpt)


def _ok(results, *names):
    for r, res in enumerate(results):
        for name in names:
            assert name not in res["errors"], f"rank {r} {name}:\n{res['errors'][name]}"


def _close(actual, expected, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _assert_matches_reference(res, case):
    ref = res["ref"]
    _close(res[case]["out"], ref["out"], f"{case} output")
    assert res[case]["grads"].keys() == ref["grads"].keys()
    for name, g in res[case]["grads"].items():
        _close(g, ref["grads"][name], f"{case} grad {name}")


def test_tp_ranks_found(results):
    assert sorted(res["tp_rank"] for res in results) == [0, 1]


@pytest.mark.parametrize("case", ["tp2", "tp2_sp"])
def test_tp2_shards_are_slices_of_tp1_weights(results, case):
    _ok(results, "ref", case)
    n_split = 0
    for res in results:
        for name, (is_tp, dim, _, shard) in res[case]["shards"].items():
            full = res["ref"]["weights"][name]
            if is_tp:
                n_split += 1
                expected = full.chunk(2, dim=dim)[res["tp_rank"]]
            else:
                expected = full
            assert torch.equal(shard, expected), f"{case} {name} rank {res['tp_rank']}"
    # qkv, proj, fc1, fc2 weights (+ column-parallel biases) of both layers are split
    assert n_split >= 2 * 2 * 4


@pytest.mark.parametrize(
    "case", ["tp2", "tp2_sp", "tp2_recompute", "tp2_sp_recompute", "tp2_recompute_distributed"])
def test_tp2_forward_and_grads_equal_tp1(results, case):
    _ok(results, "ref", case)
    for res in results:
        _assert_matches_reference(res, case)


def test_sequence_parallel_params_are_tagged_and_need_allreduce(results):
    _ok(results, "tp2_sp")
    for res in results:
        tagged = {n for n, (_, _, sp, _) in res["tp2_sp"]["shards"].items() if sp}
        # every layer norm (2 per layer + final) and the row-parallel biases (proj, fc2)
        norms = {n for n in res["ref"]["weights"] if "layernorm" in n}
        assert norms and norms <= tagged, (norms, tagged)
        assert {n for n in tagged if n.endswith("linear_proj.bias") or n.endswith("linear_fc2.bias")}
        # a rank's own grad of such a param covers only its sequence shard: not the full grad
        for name, partial in res["tp2_sp"]["sp_partial"].items():
            assert not torch.allclose(partial, res["ref"]["grads"][name], rtol=RTOL, atol=ATOL), name


def test_recompute_is_actually_used(results):
    _ok(results, "tp2", "tp2_recompute", "tp2_sp_recompute", "tp2_recompute_distributed")
    for res in results:
        for case in ("tp2_recompute", "tp2_sp_recompute", "tp2_recompute_distributed"):
            assert res[case]["grad_fn"] == "CheckpointFunctionBackward", case
        assert res["tp2"]["grad_fn"] != "CheckpointFunctionBackward"


def test_rng_tracker_streams(results):
    _ok(results, "tracker_tp1", "tracker_tp2")
    tp2 = {res["tp_rank"]: res["tracker_tp2"] for res in results}
    for tp_rank, draws in tp2.items():
        # model-parallel stream: seed + 2718 + tp_rank (megatron's offset), forks continue it
        g = torch.Generator().manual_seed(DROPOUT_SEED + 2718 + tp_rank)
        assert torch.equal(draws["mp"], torch.rand(12, generator=g))
        # default (data-parallel) stream: seeded with seed, forks leave it untouched
        g = torch.Generator().manual_seed(DROPOUT_SEED)
        assert torch.equal(draws["default"], torch.rand(12, generator=g))
    assert not torch.equal(tp2[0]["mp"], tp2[1]["mp"])  # per-TP-rank dropout in TP regions
    assert torch.equal(tp2[0]["default"], tp2[1]["default"])  # same dropout outside
    for res in results:
        assert torch.equal(res["tracker_tp1"]["mp"], tp2[0]["mp"])


@pytest.mark.parametrize("tag", ["nosp", "sp"])
def test_dropout_reproducible_and_active(results, tag):
    base, again, other = f"drop_{tag}", f"drop_{tag}_again", f"drop_{tag}_other_seed"
    _ok(results, "tp2", base, again, other)
    case = "tp2_sp" if tag == "sp" else "tp2"
    for res in results:
        out, grads, _ = res[base]
        out2, grads2, _ = res[again]
        assert torch.equal(out, out2)
        for name in grads:
            assert torch.equal(grads[name], grads2[name]), name
        assert not torch.allclose(out, res[other][0])  # the seed matters
        assert not torch.allclose(out, res[case]["out"])  # dropout is active
    # TP ranks agree on the full (gathered) output
    torch.testing.assert_close(results[0][base][0], results[1][base][0], rtol=0, atol=0)


@pytest.mark.parametrize("tag", ["nosp", "sp"])
def test_recompute_replays_dropout_masks(results, tag):
    base, rec = f"drop_{tag}", f"drop_{tag}_recompute"
    _ok(results, base, rec)
    for res in results:
        out, grads, _ = res[base]
        out_r, grads_r, grad_fn = res[rec]
        assert grad_fn == "CheckpointFunctionBackward"
        _close(out_r, out, f"{tag} recompute output")
        for name in grads:
            _close(grads_r[name], grads[name], f"{tag} recompute grad {name}")


def test_dist_checkpointing_roundtrip(results):
    _ok(results, "ckpt")
    for res in results:
        saved, loaded = res["ckpt"]["saved"], res["ckpt"]["loaded"]
        assert saved.keys() == loaded.keys()
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), name


# ----------------------------------------------------------------------------------------------
# in-process tests of the patch mechanics
# ----------------------------------------------------------------------------------------------


def test_version_guard(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match=r"0\.17\.0.*megatron_patches/cpu\.py|megatron_patches/cpu\.py.*0\.17\.0"):
        cpu_patches._check_version()
    monkeypatch.setattr(megatron.core, "__version__", "0.16.1")
    cpu_patches._check_version()


def test_noop_when_the_run_is_on_a_gpu(monkeypatch):
    """The run's device decides (dchag.device), not whether a GPU exists: no DS_ACCELERATOR and
    a GPU present -> stock megatron; DS_ACCELERATOR=cpu on a GPU host -> the CPU patches."""
    def boom():
        raise AssertionError("patching")

    monkeypatch.setattr(cpu_patches, "_APPLIED", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpu_patches, "_check_version", boom)
    monkeypatch.setattr(cpu_patches, "_patch_rng", boom)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    cpu_patches.apply_cpu_patches()
    assert cpu_patches.patches_applied() is False
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # a CPU run on a machine that has a GPU
    with pytest.raises(AssertionError, match="patching"):
        cpu_patches.apply_cpu_patches()


def test_device_rules(monkeypatch):
    from dchag import device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert device.run_device() == torch.device("cpu") and device.comm_backend() == "gloo"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(device.DeviceError, match="DS_ACCELERATOR=cpu"):
        device.run_device()
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    with pytest.raises(device.DeviceError, match="not supported"):
        device.run_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert device.run_device() == torch.device("cuda", 1) and device.comm_backend() == "nccl"
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(device.DeviceError, match="LOCAL_RANK=2"):
        device.run_device()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert device.run_device() == torch.device("cpu") and device.comm_backend() == "gloo"


def test_torch_norm_sequence_parallel_patch_applies_on_gpu_runs(monkeypatch):
    """A GPU node without apex builds torch norms too: megatron_patches.apply() on a GPU run (no
    CPU patches) still makes WrappedTorchNorm accept sequence parallel and tag its parameters."""
    import megatron_patches
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.transformer_config import TransformerConfig

    def no_cpu_patches():
        raise AssertionError("CPU patches applied on a GPU run")

    megatron_patches.apply()
    upstream = torch_norm.WrappedTorchNorm.__dict__["__new__"].__func__.__wrapped__
    monkeypatch.setattr(torch_norm.WrappedTorchNorm, "__new__", staticmethod(upstream))
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                            sequence_parallel=True, **cpu_patches.cpu_transformer_config_overrides())
    with pytest.raises(AssertionError, match="sequence parallel not supported"):
        torch_norm.WrappedTorchNorm(cfg, 8)  # upstream refuses
    monkeypatch.setattr(megatron_patches, "_applied", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(cpu_patches, "apply_cpu_patches", no_cpu_patches)
    megatron_patches.apply()
    norm = torch_norm.WrappedTorchNorm(cfg, 8)
    assert [p.sequence_parallel for p in norm.parameters()] == [True, True]


def test_config_overrides_accepted():
    from megatron.core.transformer.transformer_config import TransformerConfig

    over = cpu_patches.cpu_transformer_config_overrides()
    assert over["use_cpu_initialization"] is True
    cfg = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, **over)
    for k, v in over.items():
        assert getattr(cfg, k) == v


@pytest.fixture
def patched():
    cpu_patches.apply_cpu_patches()
    assert cpu_patches.patches_applied()


def test_causal_mask_softmax_on_cpu(patched):
    """AttnMaskType.causal with no mask passed builds megatron's default mask (upstream: cuda)."""
    from megatron.core.fusions.fused_softmax import FusedScaleMaskSoftmax
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.utils import attention_mask_func

    softmax = FusedScaleMaskSoftmax(
        input_in_fp16=False, input_in_bf16=False, attn_mask_type=AttnMaskType.causal,
        scaled_masked_softmax_fusion=False, mask_func=attention_mask_func,
        softmax_in_fp32=True, scale=None)
    scores = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    probs = softmax(scores, None)
    expected = torch.softmax(scores.masked_fill(torch.ones(5, 5).triu(1).bool(), float("-inf")), -1)
    torch.testing.assert_close(probs, expected)


def test_rotary_embedding_on_cpu(patched):
    """RotaryEmbedding without use_cpu_initialization (upstream: cuda device) works on CPU."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0)
    emb = rope(6)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8)
    freqs = torch.outer(torch.arange(6, dtype=torch.float32), inv_freq)
    torch.testing.assert_close(emb.reshape(6, 8), torch.cat([freqs, freqs], -1))
