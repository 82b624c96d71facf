"""Per-rank memory: model states (parameters, gradients, optimizer) and activations.

Model states (bytes per parameter; ZeRO shards over the DP group, the ZeRO paper's accounting):

    precision  params  grads  optimizer                  ZeRO-1: optimizer / DP
    fp32       4       4      8 (Adam m, v)              ZeRO-2: + grads / DP
                              12 with ZeRO >= 1 (DeepSpeed's fp32 partition clone)
    bf16       2       2      12 (fp32 master, m, v)     ZeRO-3: + params / DP (+ 2 gathered layers)

Activations are simulated stage by stage, forward then backward, from what each stage of
``DChagViT`` keeps alive (``saved``: tensors autograd saves, or references held until a later
stage) and the extra working memory it needs while it runs (``fwd_extra`` / ``bwd_extra``). The
figures follow the implementation (they were read off per-autograd-node RSS timelines of the
CPU build, see docs/BENCHMARKS.md) in units of

    X_r = B c_r L D a   the rank's channel tokens (a = activation bytes; c_r = C/P)
    X_N = B N L D a     the tokens the final aggregation attends over (N = C flat, G D-CHAG)
    E   = B L D a       one hidden state; s = L, b = B, h = D, F, heads H

    input (bf16)    forward_step's zero-filled fp32 copy of the input, held until the loss returns
    tokenizer       conv output + tokens                fwd +X_r  (tokens stay: X_r)    bwd 2 X_r
                    (bf16: saves the bf16 cast of its input, B c_r H W a)
    linear level    one einsum: saves its permuted      fwd +X_in (+X_in: padded        bwd saved + X_in (input
                    [n_out, B L D, S] input copy X_in   gather, uneven segments)        gradient)
    cross level     saves 4 X_in + scores + X_out       fwd saved + 2 X_in              bwd saved + X_in
    gather (P > 1)  the [B, G, L, D] result             X_N held until the final aggregation returns
    final (TP)      saves X_N (1 + 3/T) + probs         fwd +X_N + 4 X_N/T (copy, matmul, bias)
                                                        bwd X_N (1 + 5/T) (two zero-filled select grads)
    layer (TP)      saves (4 + 4/T) E + 2 s b F a/T + b H s^2 a/T (+ LN statistics);
                    bf16: + b H s^2 4/T (megatron's unfused softmax saves its fp32 output);
                    sequence parallel: 8 E/T + ...; recompute: E (E/T) per layer, one layer rebuilt in bwd
    head + loss     saves E + 2 B c_r H W 4 (MAE: squared error and weights, fp32); forward working
                    memory + B c_r H W (a + 12) (prediction; fp32 target, square, weighted error)

The peak is the largest of: any forward stage (live + its extra), any backward stage (saved
activations not yet freed + gradients produced so far + its extra), and what ZeRO does after
backward (``zero_step_peaks``: gradient buckets, the fp32 partition gradient, AdamW's temporaries;
fp32 ZeRO-0: all gradients + two temporaries of the largest parameter, torch AdamW with
foreach=False). These were checked against the real code at cluster scale by ``dchag.sim``
(docs/BENCHMARKS.md section 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dchag.planner.params import CHANNEL_STAGE, param_counts, shapes
from dchag.planner.spec import LayoutSpec, ModelSpec, validate

# The streamed stage's working memory (multiples of the chunk's buffers, forward and backward) and
# of the tokenizer's gradient buffer: fitted to RSS measurements of the CPU build (docs/BENCHMARKS.md
# section 8, where the fit's residuals are listed).
STREAM_COEFFS = {"linear": {"fwd": 1.0, "bwd": 1.75, "grads": 1.2}, "cross": {"fwd": 6.0, "bwd": 6.9, "grads": 1.0}}
# Of D-CHAG-C's streamed backward (6.9 chunk-token buffers in fp32), the part that stays fp32 in a bf16
# run: the recomputed chunk's online-softmax scores and its fp32 numerator and their gradients (the
# other 3.9 buffers are in the activation dtype). Fitted to dchag.sim (a bf16 run simulates 3 chunk
# buffers above the all-bf16 reading; tests/test_planner.py checks it).
STREAM_CROSS_BWD_FP32 = 3.0
STAT_BYTES = 4  # layer-norm mean / rstd are kept in fp32
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


@dataclass
class Stage:
    name: str
    saved: float  # bytes alive after the stage's forward until its backward
    fwd_extra: float = 0.0  # peak memory above what was alive before, while the forward runs
    bwd_total: float = 0.0  # memory while its backward runs, including its own saved tensors
    grad_params: int = 0  # parameters whose gradients this stage's backward produces
    held: float = 0.0  # output referenced (not saved) until a later stage releases it
    release_after: float = 0.0  # held bytes freed when this stage's forward ends


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    data: float
    activations: dict[str, float]  # saved-for-backward bytes: channel_stage, backbone, head
    peak_dynamic: float  # activations + gradients + transients at the step's peak
    peak_phase: str
    channel_stage_peak: float  # the channel stage run alone (fwd + bwd, no optimizer)
    param_numel: int
    extra: dict = field(default_factory=dict)

    @property
    def static(self) -> float:
        """Alive between steps: parameters, optimizer state, input batch (gradients are freed)."""
        return self.params + self.optimizer + self.data

    @property
    def total(self) -> float:
        return self.static + self.peak_dynamic

    @property
    def activation_total(self) -> float:
        return sum(self.activations.values())


def _model_state_bytes(numel: int, layout: LayoutSpec, zero_layer_numel: int) -> tuple[float, float, float]:
    DP, z = layout.data_parallel, layout.zero_stage
    if layout.precision == "fp32":
        # ZeRO >= 1: DeepSpeed's stage_1_and_2 clones the fp32 partition as its master copy
        # (``single_partition_of_fp32_groups``) even when the parameters are fp32 already
        p, g, o = 4.0, 4.0, (12.0 if z >= 1 else 8.0)
    else:
        p, g, o = 2.0, 2.0, 12.0
    params = numel * p / (DP if z >= 3 else 1)
    if z >= 3 and DP > 1:
        params += 2 * zero_layer_numel * p  # prefetched / gathered full layer parameters
    grads = numel * g / (DP if z >= 2 else 1)
    optimizer = numel * o / (DP if z >= 1 else 1)
    return params, grads, optimizer


def channel_stages(model: ModelSpec, layout: LayoutSpec, counts: dict[str, int]) -> list[Stage]:
    T, P, B, a = layout.tensor_parallel, layout.channel_parallel, layout.micro_batch_size, layout.act_bytes
    D, L, H = model.D, model.L, model.num_attention_heads
    s = shapes(model, layout)
    tok = B * L * D * a  # bytes of one token per position, whole batch
    X_r = s.c_r * tok
    N = model.G
    X_N = N * tok
    stages = []
    if model.channel_chunk:
        stages.append(streamed_stage(model, layout, counts))
        held = 0.0
    else:
        # Tokenizer: conv output, then tokens = conv + channel embedding (the conv output dies).
        # The tokens are referenced (not saved) until the channel stage returns.
        # In bf16 the model casts its input [B, c_r, H, W] to bf16 and the convolution saves that copy.
        cast = B * s.c_r * model.img_h * model.img_w * a if a < 4 else 0.0
        stages.append(Stage("tokenizer", saved=cast, held=X_r, fwd_extra=2 * X_r + cast, bwd_total=2 * X_r + cast,
                            grad_params=counts["tokenizer"]))
        held = X_r  # released when the channel stage returns
    first = 1 if model.channel_chunk else 0  # streamed: level 0 ran inside the streamed stage
    if model.aggregation == "linear":
        # One einsum per level ("bnsld,ns->bnld"): it permutes the segments into a contiguous
        # [n_out, B L D, S] copy for a batched matmul and saves that copy (X_in), not its input.
        # Uneven segments first gather a padded [B, n_out, S_max, L, D] copy (freed after the
        # forward). Backward: the saved copy + the input gradient. A tree level's input (the
        # previous level's output) is freed once the level has run.
        levels = list(zip(s.level_inputs, s.level_outputs, s.level_padded))
        for i, (n_in, n_out, n_pad) in enumerate(levels):
            if i < first:
                continue
            X_in, X_pad = n_in * tok, n_pad * tok  # X_pad = X_in unless segments are uneven
            gathered = 0.0 if n_pad == n_in else X_pad
            last = i == len(levels) - 1
            stages.append(Stage(f"partial.{i}", saved=X_pad, fwd_extra=X_pad + gathered, bwd_total=X_pad + X_in,
                                grad_params=n_in, held=0.0 if last else n_out * tok,
                                release_after=0.0 if i == 0 else X_in))
    elif model.aggregation == "cross":
        # Both kernels save the level's input copies and its k and v (4 X_in) and the projection's
        # input (X_out); unfused also its scores [B, n_in, L, H], sdpa the query and output rows
        # (2 X_out) and their fp32 log-sum-exp [B, n_out, L, H]. sdpa's backward produces the k and
        # v gradients in its [B n L, H, S, hd] rows, then in the level's layout (2 X_in), and the
        # query and output gradients (2 X_out).
        per_level = 3 * D * D + 2 * D
        sdpa = model.attention_backend == "sdpa"
        for i, (n_in, n_out) in enumerate(zip(s.level_inputs, s.level_outputs)):
            if i < first:
                continue
            X_in, X_out = n_in * tok, n_out * tok
            attention = 2 * X_out + B * n_out * L * H * 4 if sdpa else B * n_in * L * H * a
            saved = 4 * X_in + attention + X_out
            stages.append(Stage(f"partial.{i}", saved=saved, fwd_extra=saved + 2 * X_in,
                                bwd_total=saved + (2 * X_in + 2 * X_out if sdpa else X_in),
                                grad_params=n_out * per_level))
    if P > 1:  # gathered [B, G, L, D]: referenced until the final aggregation returns
        stages.append(Stage("gather", saved=0.0, held=X_N, fwd_extra=X_N))
        held += X_N
    # The final aggregation saves its input copy and k, v (X_N (1 + 2/T)); unfused also a contiguous
    # copy of k (X_N/T), the probabilities [B L, H/T, N] and the projection's input; sdpa the
    # expanded query and the output rows (the projection's input) and their fp32 log-sum-exp.
    # Forward peaks in the k/v projection (X_N + 4 X_N/T). Backward, whichever the kernel, holds
    # first the input copy, the k and v gradients and their two zero-filled [N, B L, 2 D/T] select
    # gradients (X_N (1 + 6/T)), then, in the k/v projection's backward, its input and that input's
    # gradient beside the k/v gradient (X_N (2 + 2/T)).
    proj_in = B * L * (D // T) * a
    if model.attention_backend == "sdpa":
        attention = 2 * proj_in + B * L * (H // T) * 4
        final_saved = X_N * (1 + 2 / T) + attention
    else:
        attention = B * L * N * (H // T) * a  # the probabilities
        final_saved = X_N * (1 + 3 / T) + attention + proj_in
    stages.append(Stage("final", saved=final_saved, fwd_extra=X_N + 4 * X_N / T,
                        bwd_total=X_N * max(1 + 6 / T, 2 + 2 / T) + attention, grad_params=counts["final"],
                        release_after=held))
    return stages


def streamed_stage(model: ModelSpec, layout: LayoutSpec, counts: dict[str, int]) -> Stage:
    """Tokenizer + reduction level 0, streamed over chunks (dchag/model/streaming.py), in units of

        X_k = B k L D a   the largest chunk's tokens (k <= K channels; X_kp: its padded copy)
        X_1 = B n_1 L D a level 0's output; its chunk states are fp32 (X_1s = X_1 4 / a)

    Nothing of a chunk is saved (checkpointed). Forward: one chunk's working memory, plus the
    finished chunk states and their concatenation. Backward: one chunk recomputed and
    differentiated, plus the tokenizer's full-size gradient buffer (``ChunkGradSink``) that every
    chunk adds its rows into (it becomes the parameters' gradient when the stage is done).
    linear: no tokens (the coefficients are folded into the convolution): buffers of the chunk's
            kernels and input slice; output held by the next stage.
    cross:  chunk tokens, keys, values and the projections' copies; saves the fp32 numerator and the
            normalized mix for the output projection."""
    B, a = layout.micro_batch_size, layout.act_bytes
    s = shapes(model, layout)
    tok = B * model.L * model.D * a
    X_k, X_kp = s.stream_chunk * tok, s.stream_padded * tok
    gathered = X_kp if s.stream_padded > s.stream_chunk else 0.0
    n1 = s.level_outputs[0]
    X_1, X_1s = n1 * tok, n1 * tok * max(4, a) / a
    grad_buffer = counts["tokenizer"] * a
    held = 0.0 if model.tree_levels == 1 else X_1
    c = STREAM_COEFFS[model.aggregation]
    if model.aggregation == "linear":
        # no token is built: per chunk, kernels w_i W_i and the convolution's buffers, which scale
        # with the chunk's parameters and input slice, U_k = k (D p^2 + B H W) a
        U_k = s.stream_chunk * (model.D * model.patch_dim ** 2 + B * model.img_h * model.img_w) * a
        return Stage("streamed", saved=0.0, held=held, fwd_extra=c["fwd"] * U_k + 2 * X_1s,
                     bwd_total=c["bwd"] * U_k + c["grads"] * grad_buffer,
                     grad_params=counts["tokenizer"] + s.level_inputs[0])
    per_level = 3 * model.D * model.D + 2 * model.D
    saved = X_1s + X_1
    fp32 = STREAM_CROSS_BWD_FP32 * X_kp * (4 / a - 1)  # those buffers' extra bytes when a < 4
    return Stage("streamed", saved=saved, held=held, fwd_extra=saved + c["fwd"] * X_kp + 2 * X_1s,
                 bwd_total=saved + c["bwd"] * X_kp + fp32 + c["grads"] * grad_buffer,
                 grad_params=counts["tokenizer"] + n1 * per_level)


def core_attention(model: ModelSpec, layout: LayoutSpec) -> tuple[float, float, float]:
    """A backbone layer's core attention on its T-th of the heads: (bytes saved for backward,
    forward working memory, backward working memory), beside its q, k, v and output, which the
    layer's (4 + 4/T) E count already holds.

    unfused (megatron's DotProductAttention): saves the probabilities [b, h/T, s, s] (a bytes), and
        in bf16 also its fp32 softmax output (attention_softmax_in_fp32); forward holds one more
        score-sized tensor; the softmax's backward three fp32-sized ones in fp32 (the gradients of
        the probabilities, of the scores, and the dropout's), two in bf16 (its fp32 gradients).
    sdpa (FlashAttention / memory-efficient / cuDNN on GPUs, the flash kernel on the CPU): saves
        the softmax's log-sum-exp [b, h/T, s] in fp32, never a score matrix; backward produces the
        q, k, v gradients (3 E/T) in a workspace of one fp32 [b, h/T, s, d] accumulator of the
        query gradient and the fp32 row sums of dO * O [b, h/T, s] (FlashAttention-2's backward)."""
    T, B, a = layout.tensor_parallel, layout.micro_batch_size, layout.act_bytes
    D, L, H = model.D, model.L, model.num_attention_heads
    E_T = B * L * D * a / T
    if model.attention_backend == "sdpa":
        rows = B * (H // T) * L * 4  # one fp32 value per query row and head
        return rows, 0.0, 3 * E_T + B * L * (D // T) * 4 + rows
    elements = B * (H // T) * L * L
    softmax32 = elements * 4 if a < 4 else 0.0
    return elements * a + softmax32, elements * a, elements * (12 if a == 4 else 8)


def backbone_stages(model: ModelSpec, layout: LayoutSpec, counts: dict[str, int]) -> list[Stage]:
    T, B, a = layout.tensor_parallel, layout.micro_batch_size, layout.act_bytes
    D, L, H, F = model.D, model.L, model.num_attention_heads, model.F
    sp = layout.sequence_parallel and T > 1
    E = B * L * D * a
    sbF = B * L * F * a / T
    attn_saved, attn_fwd, attn_bwd = core_attention(model, layout)
    stats = 4 * B * L * STAT_BYTES / (T if sp else 1)
    if sp:
        layer_saved = 8 * E / T + 2 * sbF + attn_saved + stats
    else:
        layer_saved = (4 + 4 / T) * E + 2 * sbF + attn_saved + stats
    layer_fwd = layer_saved + 2 * sbF + attn_fwd + E
    # Backward meets the MLP first (the gradients flowing in and of fc2's input), then the core
    # attention, by when the MLP's saved tensors (its input and two [s, b, F/T] activations) and
    # the output projection's input are freed.
    mlp_saved = (E / T if sp else E) + 2 * sbF
    layer_bwd_extra = max(2 * E + sbF, 2 * E + E / T + attn_bwd - mlp_saved - E / T)
    layer_params = (counts["backbone"] - 2 * D) // model.num_layers
    stages = [Stage("embed", saved=0.0, fwd_extra=2 * E, bwd_total=E, grad_params=counts["embed"])]
    for i in range(model.num_layers):
        if layout.recompute:
            checkpoint = E / T if sp else E
            # backward recomputes the layer: its full activations exist again, plus the usual extra
            stages.append(Stage(f"layer.{i}", saved=checkpoint, fwd_extra=layer_fwd,
                                bwd_total=checkpoint + layer_saved + layer_bwd_extra, grad_params=layer_params))
        else:
            stages.append(Stage(f"layer.{i}", saved=layer_saved, fwd_extra=layer_fwd,
                                bwd_total=layer_saved + layer_bwd_extra, grad_params=layer_params))
    final_ln = (E / T if sp else E) + 2 * B * L * STAT_BYTES / (T if sp else 1)
    stages.append(Stage("final_norm", saved=final_ln, fwd_extra=final_ln + E, bwd_total=final_ln + 2 * E, grad_params=2 * D))
    return stages


def head_stages(model: ModelSpec, layout: LayoutSpec, counts: dict[str, int]) -> list[Stage]:
    B, a = layout.micro_batch_size, layout.act_bytes
    D, L = model.D, model.L
    E = B * L * D * a
    s = shapes(model, layout)
    outputs = s.c_r if model.task == "mae" else model.V
    pix = B * outputs * model.img_h * model.img_w
    saved = E + 2 * pix * 4  # head input copy; loss: error and weights (fp32)
    # forward: the prediction (a) and, while the loss runs, its fp32 target, square and weighted error
    stages = [Stage("head", saved=saved, fwd_extra=saved + pix * (a + 12), bwd_total=saved + 2 * pix * 4,
                    grad_params=counts["head"])]
    if a < 4 and not model.channel_chunk:  # bf16: forward_step's zero-filled fp32 input lives until the loss returns
        stages[0].release_after = B * s.c_r * model.img_h * model.img_w * 4
    return stages


def input_stage(model: ModelSpec, layout: LayoutSpec) -> list[Stage]:
    """bf16: forward_step's zero-filled fp32 copy of the input, referenced through the forward; the
    streamed stage's chunk checkpoints save it (their slices are views of it) until its backward.
    (In fp32 the tokenizer or the checkpoints save it as the benchmark's own input, which the
    planner does not count.)"""
    if layout.act_bytes >= 4:
        return []
    s = shapes(model, layout)
    bytes_ = layout.micro_batch_size * s.c_r * model.img_h * model.img_w * 4
    if model.channel_chunk:
        return [Stage("input", saved=bytes_)]
    return [Stage("input", saved=0.0, held=bytes_)]


def _simulate(stages: list[Stage], grad_bytes_per_param: float, grads_before: float = 0.0,
              grad_cap: float | None = None) -> tuple[float, str, float]:
    """Returns (peak dynamic bytes, where, gradient bytes at the end). ``grad_cap``: gradients
    alive in backward never exceed it (ZeRO-2 reduces and frees them bucket by bucket)."""
    live, peak, where = 0.0, 0.0, ""
    for st in stages:
        if live + st.fwd_extra > peak:
            peak, where = live + st.fwd_extra, f"forward {st.name}"
        live += st.saved + st.held
        if live > peak:
            peak, where = live, f"forward {st.name}"
        live -= st.release_after
    grads = grads_before
    for st in reversed(stages):
        live -= st.saved
        cur = live + grads + st.bwd_total
        if cur > peak:
            peak, where = cur, f"backward {st.name}"
        grads += st.grad_params * grad_bytes_per_param
        if grad_cap is not None:
            grads = min(grads, grad_cap)
    return peak, where, grads


def zero_step_peaks(numel: int, layout: LayoutSpec, largest: int, bucket: int = REDUCE_BUCKET) -> dict[str, float]:
    """Memory above the static state after backward: gradient reduction and optimizer step, as
    DeepSpeed's ZeRO 0-2 hold them (``deepspeed/runtime/zero/stage_1_and_2.py``; emulated on fake
    tensors by ``dchag.sim.zero``). n = the rank's partition (N / DP for ZeRO >= 1):

        reduce   every gradient (N g) + the flat bucket being reduced (min(N, bucket) g) + the
                 partition's fp32 gradient (4 n)
        step     the partition's fp32 gradient + two fp32 temporaries of the partition (AdamW)
        gather   ZeRO >= 1: the partition's fp32 gradient + the bucket all-gathered (min(N, bucket) p)

    fp32 ZeRO-0 is torch's AdamW on the parameters: every gradient + two temporaries of the
    largest parameter (no flat copies).
    """
    g = layout.act_bytes
    z, DP = layout.zero_stage, layout.data_parallel
    if layout.precision == "fp32" and z == 0:
        return {"optimizer step": numel * g + 2 * largest * 4.0}
    n = -(-numel // (DP if z >= 1 else 1))
    part_grad = 4.0 * n
    b = min(numel, bucket)
    out = {"optimizer step": part_grad + 2 * 4.0 * n}
    if z < 2:
        out["gradient reduction"] = numel * g + b * g + part_grad + (b * g / DP if z == 1 else 0.0)
    if z >= 1:
        out["parameter all-gather"] = part_grad + b * g * (1 + 1 / DP)
    return out


def model_states(model: ModelSpec, layout: LayoutSpec) -> tuple[dict[str, int], float, float, float]:
    """(parameters per component, and the bytes of parameters, gradients and optimizer state) of
    one rank: arithmetic only, whatever the layer count (``estimate_memory`` simulates every layer)."""
    validate(model, layout)
    counts = param_counts(model, layout)
    layer_numel = (counts["backbone"] - 2 * model.D) // model.num_layers
    return (counts, *_model_state_bytes(sum(counts.values()), layout, layer_numel))


def batch_bytes(model: ModelSpec, layout: LayoutSpec) -> float:
    """The rank's input micro-batch: its channels' images (float32) and validity mask (bool)."""
    return layout.micro_batch_size * shapes(model, layout).c_r * model.img_h * model.img_w * (4 + 1)


def estimate_memory(model: ModelSpec, layout: LayoutSpec) -> MemoryEstimate:
    counts, params, grads, optimizer = model_states(model, layout)
    numel = sum(counts.values())
    g = 4.0 if layout.precision == "fp32" else 2.0
    inp = input_stage(model, layout)
    ch = channel_stages(model, layout, counts)
    bb = backbone_stages(model, layout, counts)
    hd = head_stages(model, layout, counts)
    if layout.zero_stage == 2:  # gradients reduced bucket by bucket in backward into the fp32 partition
        n = -(-numel // layout.data_parallel)
        bucket = min(numel, REDUCE_BUCKET) * g
        peak, where, _ = _simulate(inp + ch + bb + hd, g, grads_before=4.0 * n, grad_cap=4.0 * n + 2 * bucket)
    else:  # ZeRO-3 as ZeRO-2 in the ZeRO paper's accounting: gradients / DP
        peak, where, grads_end = _simulate(inp + ch + bb + hd, g / (layout.data_parallel if layout.zero_stage == 3 else 1))
    largest = max(model.L * model.D, 2 * model.D * model.D // layout.tensor_parallel,
                  model.D * model.F // layout.tensor_parallel, 3 * model.D * model.D // layout.tensor_parallel)
    if layout.zero_stage <= 2:
        for name, value in zero_step_peaks(numel, layout, largest).items():
            if value > peak:
                peak, where = value, name
    else:  # ZeRO-3 (not simulated): every gradient + two temporaries of the largest parameter tensor
        opt_peak = grads_end + 2 * largest * 4.0
        if opt_peak > peak:
            peak, where = opt_peak, "optimizer step"
    ch_peak, _, _ = _simulate(ch, g)
    data = batch_bytes(model, layout)
    activations = {
        "channel_stage": sum(st.saved for st in inp + ch),  # streamed: its checkpoints save the input
        "backbone": sum(st.saved for st in bb),
        "head": sum(st.saved for st in hd),
    }
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, data=data, activations=activations,
                          peak_dynamic=peak, peak_phase=where, channel_stage_peak=ch_peak, param_numel=numel,
                          extra={"counts": counts})


def channel_stage_param_numel(model: ModelSpec, layout: LayoutSpec) -> int:
    counts = param_counts(model, layout)
    return sum(counts[k] for k in CHANNEL_STAGE)
