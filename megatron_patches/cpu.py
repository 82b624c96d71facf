"""Make megatron-core 0.16.x run on a CPU-only torch build (gloo backend).

megatron-core assumes a CUDA device in a handful of places.  On a CPU-only torch build those
calls raise ("Torch not compiled with CUDA enabled") or, worse, silently do nothing
(``torch.cuda.manual_seed`` is a lazy no-op there).  :func:`apply_cpu_patches` redirects exactly
those places to the CPU.  It is

* a no-op when the run's device is a GPU (``dchag.device``: ``DS_ACCELERATOR``, else whether a GPU
  is present), so GPU runs use stock megatron-core, and ``DS_ACCELERATOR=cpu`` on a GPU host
  still gets the CPU patches (``make test`` on a GPU machine);
* idempotent: calling it again changes nothing;
* version-guarded: it refuses (``RuntimeError``) any megatron-core other than 0.16.x, because
  every patch below names an upstream line of that release.

Call it once per process, after ``import torch`` and before building any megatron module or
calling ``parallel_state.initialize_model_parallel``/``model_parallel_cuda_manual_seed``.
Call megatron functions through their module (``tensor_parallel.model_parallel_cuda_manual_seed``)
or import them after patching: a ``from megatron.core.tensor_parallel import
model_parallel_cuda_manual_seed`` executed earlier keeps the unpatched function.

RNG consequences on CPU (same streams as on a GPU, but they share one generator):

* ``model_parallel_cuda_manual_seed(seed)`` must run before the first forward (attention always
  forks the tracker, even with dropout 0) and it reseeds the global CPU generator, which
  ``use_cpu_initialization`` draws weights from and which is the default (data-parallel) stream
  used by hidden dropout outside sequence parallel.  That stream must stay identical across TP
  ranks: draw data-side randomness (e.g. MAE masks) from a dedicated ``torch.Generator``.

What is patched (all paths relative to ``megatron/core``):

1. RNG, ``tensor_parallel/random.py``.  On a GPU megatron keeps two kinds of generator: the
   CPU one (unused by the model's forward) and the CUDA one, which the model-parallel tracker
   swaps between named streams (``data-parallel-rng``, ``model-parallel-rng`` seeded
   ``seed + 2718 + tp_rank``, ``expert-parallel-rng``).  On CPU, dropout draws from the CPU
   generator, so the CPU generator plays the role of the CUDA one: the tracker swaps *its* state.

   * ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``: read/write the CPU generator.  These two
     are module globals that ``CudaRNGStatesTracker.fork``, ``_get_all_rng_states`` /
     ``_set_all_rng_states`` (hence ``CheckpointFunction`` and ``CheckpointWithoutOutput``, i.e.
     activation recompute) look up at call time, so recompute restores the exact stream.
   * ``CudaRNGStatesTracker.add``: upstream ``torch.cuda.get_rng_state()`` /
     ``torch.cuda.manual_seed(seed)``.
   * ``CudaRNGStatesTracker.fork``: upstream logic unchanged except that its
     "CPU RNG state changed within GPU RNG context" check is dropped (on CPU the forked stream
     *is* the CPU generator, so that check would warn on every dropout).
   * ``model_parallel_cuda_manual_seed``: upstream ``torch.cuda.manual_seed(data_parallel_seed)``
     sets the default (data-parallel) stream; on CPU we seed the CPU generator instead.

2. Device queries (``torch.cuda.current_device()`` / ``torch.cuda.synchronize()``) inside a
   fixed list of megatron modules (:data:`_CPU_DEVICE_MODULES`): the module's global ``torch``
   is replaced by a thin proxy that forwards everything to the real ``torch`` except
   ``torch.cuda.current_device()`` (-> ``torch.device("cpu")``) and ``torch.cuda.synchronize()``
   (-> no-op).  Those two calls can only raise on a CPU build, so nothing that worked before
   changes.  This covers e.g. ``GlobalMemoryBuffer.get_tensor`` (sequence-parallel all-gather
   buffer, attention score buffer), the sequence-parallel reduce-scatter in
   ``LinearWithGradAccumulationAndAsyncCommunication.backward`` and the ``torch.cuda.synchronize``
   calls in ``dist_checkpointing``.  Code with a literal ``device="cuda"`` is not covered by this
   (see 3).

3. Literal ``device="cuda"``: ``transformer/utils.py`` ``get_default_causal_mask`` and
   ``get_sliding_window_causal_mask`` (also bound by name in ``fusions/fused_softmax.py``).

4. (Moved) Sequence parallel with torch norms is not a CPU matter: any host without apex
   builds torch norms, GPU nodes included. That patch lives in ``megatron_patches.torch_norm``
   and :func:`megatron_patches.apply` applies it on every device.

Not patched (not on the TransformerBlock / dist_checkpointing-save-load path; they still need a
GPU): ``tensor_parallel/data.py`` ``broadcast_data``, ``dist_checkpointing/exchange_utils.py``
(fully-parallel *load* exchange), ``state_dict_saver.verify_global_md_reuse`` (cached metadata),
inference KV-cache allocation, CUDA graphs, transformer-engine / apex paths.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from megatron_patches.version import require_megatron

_APPLIED = False


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def cpu_transformer_config_overrides() -> dict:
    """TransformerConfig kwargs a model needs on CPU (merge them into your config kwargs).

    * ``use_cpu_initialization=True``: weights are built on the host (the GPU path allocates on
      ``torch.cuda.current_device()``), and the full master weight is drawn from the global torch
      RNG then split, so TP shards are slices of the TP=1 weights for the same seed.
    * fusions off: the bias-dropout-add, bias-GeLU and masked-softmax fusions and the persistent
      layer norm are CUDA kernels / apex; gradient-accumulation fusion needs the
      ``fused_weight_gradient_mlp_cuda`` extension.
    * ``apply_rope_fusion=False``: fused RoPE is a transformer-engine / CUDA kernel.
    * ``cross_entropy_loss_fusion=False``: only relevant to megatron's GPT heads; harmless.
    """
    return dict(
        use_cpu_initialization=True,
        bias_dropout_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        cross_entropy_loss_fusion=False,
    )


def apply_cpu_patches() -> None:
    """Patch megatron-core 0.16.x so it runs on a CPU-only torch build. See module docstring."""
    global _APPLIED
    from dchag.device import runs_on_cpu
    if _APPLIED or not runs_on_cpu():
        return
    _check_version()
    from megatron_patches.optional import quiet
    quiet(cpu=True)  # megatron's CUDA_DEVICE_MAX_CONNECTIONS advice is for GPUs

    _patch_rng()
    for module_name in _CPU_DEVICE_MODULES:
        _redirect_device_queries(importlib.import_module(module_name))
    _patch_causal_masks()
    from megatron_patches.torch_norm import patch_torch_norm_sequence_parallel
    patch_torch_norm_sequence_parallel()  # also applied on GPUs by megatron_patches.apply()
    _APPLIED = True


def patches_applied() -> bool:
    """True once :func:`apply_cpu_patches` has patched megatron in this process."""
    return _APPLIED


# --------------------------------------------------------------------------------------------
# version guard
# --------------------------------------------------------------------------------------------


def _check_version() -> None:
    require_megatron("megatron_patches/cpu.py")


# --------------------------------------------------------------------------------------------
# 1. RNG (megatron/core/tensor_parallel/random.py)
# --------------------------------------------------------------------------------------------


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    """Replaces ``random._get_cuda_rng_state``.

    Upstream: ``return torch.cuda.random.get_rng_state(device=device)`` (or the CUDA default
    generator's graph-safe state).  On CPU the tracked stream lives in the CPU generator.
    ``torch.get_rng_state()`` already returns a fresh copy, so ``clone`` needs no extra work.
    """
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA graph) RNG states do not exist on CPU")
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=-1, graph_safe: bool = False):
    """Replaces ``random._set_cuda_rng_state``.

    Upstream: ``_lazy_call(cb)`` with ``cb`` setting ``torch.cuda.default_generators[idx]``; on a
    CPU build ``_lazy_call`` queues the callback forever, i.e. the state is silently *not* set.
    """
    if graph_safe:
        raise NotImplementedError("graph-safe (CUDA graph) RNG states do not exist on CPU")
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name, seed):
    """Replaces ``CudaRNGStatesTracker.add``.

    Upstream::

        orig_rng_state = torch.cuda.get_rng_state()      # raises on a CPU build
        torch.cuda.manual_seed(seed)                     # no-op on a CPU build
        self.states_[name] = torch.cuda.get_rng_state()
        _set_cuda_rng_state(orig_rng_state)

    Same bookkeeping, on the CPU generator.
    """
    if self.use_cudagraphable_rng:
        raise NotImplementedError("use_cudagraphable_rng is a CUDA-graph feature")
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception('seed {} already exists'.format(seed))
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception('cuda rng state {} already exists'.format(name))
    orig_rng_state = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig_rng_state)


def _make_cpu_tracker_fork(name_default):
    @contextlib.contextmanager
    def fork(self, name=name_default):
        """Replaces ``CudaRNGStatesTracker.fork``.

        Upstream logic (swap the generator to ``states_[name]``, run, store the advanced state
        back, restore the previous stream; nested forks keyed by ``_current_state_name``) is kept
        as is.  Dropped: upstream's ``cpu_rng_state = torch.get_rng_state()`` ... ``warning('CPU
        RNG state changed within GPU RNG context')`` check, which on CPU would fire on every fork
        because the forked stream is the CPU generator itself.
        """
        if name not in self.states_:
            raise Exception('cuda rng state {} is not added'.format(name))
        orig_rng_state = torch.get_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":
            self.states_[orig_state_name] = orig_rng_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f'current state name {self._current_state_name} is not the same as the '
                    f'desired state name {name}.'
                )
            self.states_[name] = torch.get_rng_state()
            if orig_state_name != "default-rng":
                orig_rng_state = self.states_[orig_state_name]
            torch.set_rng_state(orig_rng_state)
            self._current_state_name = orig_state_name

    return fork


def _wrap_model_parallel_cuda_manual_seed(original):
    @functools.wraps(original)
    def model_parallel_cuda_manual_seed(seed: int, *args, **kwargs):
        """Wraps ``random.model_parallel_cuda_manual_seed``.

        Upstream: ``torch.cuda.manual_seed(data_parallel_seed)`` sets the default
        (data-parallel) stream, used e.g. by hidden dropout outside sequence parallel; on a CPU
        build it is a no-op.  Here the CPU generator gets that seed (``data_parallel_seed ==
        seed`` upstream), then upstream runs unchanged (its tracker ``add`` calls are patched).
        NB: this reseeds the global CPU generator, which ``use_cpu_initialization`` also draws
        weights from.
        """
        torch.manual_seed(seed)
        return original(seed, *args, **kwargs)

    model_parallel_cuda_manual_seed.__megatron_cpu_patch__ = True
    return model_parallel_cuda_manual_seed


def _patch_rng() -> None:
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = _cpu_get_rng_state
    mp_random._set_cuda_rng_state = _cpu_set_rng_state
    mp_random.CudaRNGStatesTracker.add = _cpu_tracker_add
    mp_random.CudaRNGStatesTracker.fork = _make_cpu_tracker_fork(
        mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME
    )
    if not getattr(mp_random.model_parallel_cuda_manual_seed, "__megatron_cpu_patch__", False):
        patched = _wrap_model_parallel_cuda_manual_seed(mp_random.model_parallel_cuda_manual_seed)
        mp_random.model_parallel_cuda_manual_seed = patched
        # re-exported by name: megatron.core.tensor_parallel.model_parallel_cuda_manual_seed
        tensor_parallel.model_parallel_cuda_manual_seed = patched


# --------------------------------------------------------------------------------------------
# 2. torch.cuda.current_device() / torch.cuda.synchronize() inside megatron modules
# --------------------------------------------------------------------------------------------

# module -> the upstream functions whose torch.cuda.current_device()/synchronize() is redirected
_CPU_DEVICE_MODULES = {
    # GlobalMemoryBuffer.get_tensor: `device=torch.cuda.current_device()` (sequence-parallel
    # all-gather buffer, DotProductAttention's baddbmm buffer).
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor",
    # _gather_along_first_dim / _reduce_scatter_along_first_dim / _gather_along_last_dim /
    # _AllToAll.forward: `output = torch.empty(dim_size, ..., device=torch.cuda.current_device())`
    # (sequence-parallel scatter/gather regions, LayerNorm/dropout in SP).
    "megatron.core.tensor_parallel.mappings": "_gather_along_first_dim, "
    "_reduce_scatter_along_first_dim, _gather_along_last_dim, _AllToAll.forward",
    # LinearWithGradAccumulationAndAsyncCommunication.backward (sequence parallel):
    # `sub_grad_input = torch.empty(dim_size, ..., device=torch.cuda.current_device())`.
    "megatron.core.tensor_parallel.layers": "LinearWithGradAccumulationAndAsyncCommunication"
    ".backward, *ParallelLinear.__init__ / VocabParallelEmbedding.__init__ (GPU-init branch)",
    # split_tensor_into_1d_equal_chunks(new_buffer=True) / gather_split_1d_tensor:
    # used by CheckpointFunction with distribute_saved_activations=True.
    "megatron.core.tensor_parallel.utils": "split_tensor_into_1d_equal_chunks, "
    "gather_split_1d_tensor",
    # RotaryEmbedding.__init__ (`torch.arange(..., device=torch.cuda.current_device())`) and
    # RotaryEmbedding.get_emb (`self.inv_freq.to(device=torch.cuda.current_device())`).
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "RotaryEmbedding.__init__, "
    "RotaryEmbedding.get_emb",
    # dist_checkpointing: FileSystemWriterAsync.preload_tensors `torch.cuda.synchronize()`.
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "FileSystemWriterAsync"
    ".preload_tensors",
    # save_state_dict_async_finalize: `failures_occurred = torch.tensor(...,
    # device=torch.cuda.current_device())`.
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "save_state_dict_async_finalize",
    # AsyncCaller.sync_all_async_calls (current_device), TemporalAsyncCaller /
    # PersistentAsyncCaller.schedule_async_call (`torch.cuda.synchronize()`).
    "megatron.core.dist_checkpointing.strategies.async_utils": "AsyncCaller.sync_all_async_calls, "
    "*.schedule_async_call",
    # FullyParallelSaveStrategyWrapper / FullyParallelLoadStrategyWrapper: torch.cuda.synchronize().
    "megatron.core.dist_checkpointing.strategies.fully_parallel": "FullyParallel*StrategyWrapper",
    # TensorAwareStateDict: torch.cuda.synchronize() after exchange_by_distribution.
    "megatron.core.dist_checkpointing.tensor_aware_state_dict": "TensorAwareStateDict"
    ".restore_tensors / load",
}


class _CpuCuda:
    """Stands in for ``torch.cuda`` inside one megatron module; forwards all but two names."""

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        """``torch.cuda.current_device()`` -> the CPU device, usable as ``device=``."""
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None):
        """``torch.cuda.synchronize()`` -> nothing to wait for on the CPU."""
        return None


class _TorchWithCpuCuda(types.ModuleType):
    """Stands in for the module global ``torch`` of one megatron module."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()

    def __getattr__(self, name):  # only called for names not set on the proxy itself
        return getattr(torch, name)


_TORCH_PROXY = _TorchWithCpuCuda()


def _redirect_device_queries(module) -> None:
    if module.__dict__.get("torch") is torch:
        module.torch = _TORCH_PROXY
    elif module.__dict__.get("torch") is not _TORCH_PROXY:
        raise RuntimeError(
            f"megatron_patches/cpu.py: {module.__name__} has no module-level `torch`; "
            f"megatron-core changed, re-check the patch list"
        )


# --------------------------------------------------------------------------------------------
# 3. literal device="cuda" masks (megatron/core/transformer/utils.py)
# --------------------------------------------------------------------------------------------


def _cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """Replaces ``transformer.utils.get_default_causal_mask``.

    Upstream: ``torch.triu(torch.ones(sq, sq, device="cuda"), diagonal=1).bool()``.
    Used by FusedScaleMaskSoftmax for AttnMaskType.causal when no mask is passed.
    """
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def _cpu_sliding_window_causal_mask(sq, skv, window_size):
    """Replaces ``transformer.utils.get_sliding_window_causal_mask``.

    Upstream: ``m = torch.ones(sq, skv, dtype=torch.bool, device="cuda")``.
    """
    m = torch.ones(sq, skv, dtype=torch.bool)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _patch_causal_masks() -> None:
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_default_causal_mask
        module.get_sliding_window_causal_mask = _cpu_sliding_window_causal_mask
