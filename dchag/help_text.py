"""``--help`` text for every flag of pretrain_dchag.py, kept apart from the parser so flags can be
added in small hunks; ``apply(parser)`` fills the help of every option that has none, and the
formatter appends each option's default (except where the default is "not given")."""

from __future__ import annotations

import argparse

HELP = {
    # data
    "--task": "what to train: mae (masked autoencoder: reconstruct the masked patches of every channel), "
              "forecast (the state --lead-time steps ahead), regress (K per-pixel target maps from --target-path; "
              "MSE, R^2 per target) or segment (a per-pixel class map from --target-path; cross-entropy, accuracy, "
              "mean IoU)",
    "--target-path": "regress/segment: the per-pixel targets, pixel-aligned with --data-path, in any format the "
                     "data may have (docs/DATA.md): regress [K, H, W] or [N, K, H, W] (non-finite/no-data values "
                     "ignored), segment an integer class map [H, W], [N, H, W] or [N, 1, H, W]; 'synthetic' with "
                     "synthetic data: the generator's endmember abundances (regress) or their argmax (segment)",
    "--num-classes": "segment: K, the number of classes (class values 0 .. K-1; any other value except "
                     "--ignore-index is an error at start-up)",
    "--ignore-index": "segment: the class-map value of pixels left out of the loss and the metrics (NaN too)",
    "--data-path": "a file or a folder of files ([C, H, W] or [N, C, H, W]; for forecast a time series "
                   "[T, C, H, W]), or 'synthetic[:k=v,...]' for generated data. Several sources blend (--task mae, "
                   "Megatron's syntax): '0.4 A 0.3 B 0.3 C' (weights, then paths; normalized) or 'A B C' (in "
                   "proportion to the sources' training samples); each source keeps its own format, channels, "
                   "statistics and held-out split, and each training step reads one source (docs/BLENDS.md)",
    "--data-format": "the reader; auto detects it from the file name or contents",
    "--num-channels": "C, the channel count; default: read from the data (a mismatch with the data is an error). "
                      "With a blend: the model's channels, the union of the sources' channels (given, it must equal "
                      "that count); a synthetic source of a blend gives its own count in its spec (synthetic:c=13,...)",
    "--img-h": "tile height in pixels; images larger than --img-h x --img-w are cut into tiles covering every pixel "
               "(where the tile does not divide the image, the last row/column of tiles is padded with invalid "
               "pixels, reported at start-up)",
    "--img-w": "tile width in pixels",
    "--patch-dim": "ViT patch size p (p divides --img-h and --img-w); required, except with --finetune, where it is "
                   "the pretrained model's",
    "--valid-fraction": "fraction of the tiles (mae) or time steps (forecast) held out for validation: the last "
                        "ones, no shuffling",
    "--channels-last": "plain arrays (.npy, HDF5/Zarr arrays) are stored channels-last, [H, W, C] or [N, H, W, C]; "
                       "without it they are read in the documented channels-first layout [C, H, W] / [N, C, H, W] "
                       "(docs/DATA.md, the channel axis)",
    "--data-strict": "read every sample at start-up and refuse invalid values (NaN/Inf, no-data) before training; "
                     "without it they are zero-filled, masked out of the loss and counted",
    "--num-workers": "DataLoader worker processes per rank",
    "--mask-ratio": "mae: fraction of the patches masked in every tile",
    "--lead-time": "forecast: how many time steps ahead to predict",
    "--lat-weighting": "forecast on a grid with latitudes: the weight of each row in the loss, RMSE and ACC; area = "
                       "WeatherBench 2's cell-area weights (a pole row weighs its half cell), cos = cos(latitude) "
                       "(ClimaX; a pole row weighs 0); the same on a cell-centred grid without pole rows",
    # model
    "--num-layers": "transformer layers of the backbone",
    "--hidden-size": "hidden size D of the tokens",
    "--num-attention-heads": "attention heads (divisible by --tensor-model-parallel-size)",
    "--ffn-hidden-size": "MLP hidden size; default: 4 x --hidden-size",
    "--dchag-aggregation": "cross-channel aggregation: flat (one cross-attention over all channels, the baseline), "
                           "linear (D-CHAG-L: a learned map per channel group) or cross (D-CHAG-C: a cross-attention "
                           "per group)",
    "--dchag-groups": "G, channel groups aggregated before the all-gather (a model hyperparameter; "
                      "--channel-parallel-size divides it). Fewer channels per group train closer to flat: "
                      "D-CHAG-L's MAE gap was +0.3/+1.2/+3.0/+4.0/+7.9 %% at 1/2/4/8/16 channels per group "
                      "(docs/PARITY.md section 6)",
    "--dchag-tree-levels": "levels of the partial aggregation inside each group (2: sub-groups first)",
    "--dchag-cross-projections": "D-CHAG-C's per-group projections: per-group (the paper's: key, value and output "
                                 "D x D matrices per group) or none (the group's learned query attends over the "
                                 "channel tokens themselves: D parameters per group; measured, not a default: "
                                 "docs/PARITY.md section 6)",
    "--dchag-channel-chunk": "K: stream tokenization and the partial aggregation over K channels at a time, "
                             "recomputing each chunk in backward: the channel stage's memory stops growing with the "
                             "channel count (linear/cross; 0 = off). Default: 64 for linear (it is also faster: "
                             "the coefficients fold into the convolution), 0 for cross (streaming costs it "
                             "up to ~2x channel-stage time); docs/BENCHMARKS.md section 8",
    "--channel-embedding": "what tells the aggregation which channel a token came from: learned (one learned vector "
                           "per channel) or wavelength (the same plus a fixed sin-cos embedding of the channel's "
                           "wavelength in nm, Panopticon's; an unseen band then starts near its spectral neighbours; "
                           "needs wavelengths in the data). With --finetune: default the pretrained model's",
    "--hidden-dropout": "dropout after attention and MLP",
    "--attention-dropout": "dropout of the attention probabilities",
    "--recompute-activations": "recompute each transformer layer in the backward pass (less memory, more compute)",
    # parallel
    "--tensor-model-parallel-size": "T, tensor-parallel ranks (Megatron); the data-parallel size is world / T",
    "--channel-parallel-size": "P, ranks sharing the channel stage (P divides T and --dchag-groups); P = T is the "
                               "paper's layout",
    "--sequence-parallel": "Megatron sequence parallelism inside the tensor-parallel group",
    # training
    "--train-iters": "iterations to train (the total, counting those before a resume)",
    "--lr": "peak learning rate (AdamW)",
    "--min-lr": "learning rate at the end of the decay",
    "--lr-warmup-iters": "linear warmup iterations",
    "--lr-decay-style": "decay after the warmup",
    "--weight-decay": "AdamW weight decay",
    "--dchag-group-norm": "layernorm: normalize every group token over the hidden size (a scale and shift per "
                          "group) before the final aggregation; none: as the paper (measured, not a default: "
                          "docs/PARITY.md section 6)",
    "--dchag-coefficient-lr-scale": "size: D-CHAG-L's coefficients of segments of n tokens (n = C/G at the first "
                                    "tree level, 2 above it) train at 1/n x their rate, the same relative step for "
                                    "every group size (they start at 1/n); none: at the rate of the rest (measured, "
                                    "not a default: docs/PARITY.md section 6)",
    "--dchag-partial-lr-mult": "learning-rate multiplier of D-CHAG's partial aggregation (its parameter groups' "
                               "lr_mult, as megatron's); below 1 that stage learns slower than the rest of the model, "
                               "0 freezes it. 0.1 let every D-CHAG-C run of docs/PARITY.md's MAE study leave the "
                               "initial plateau (3 of 10 stay on it at 1) but cost D-CHAG-C its gain on the forecast "
                               "study",
    "--adam-beta1": "AdamW beta1",
    "--adam-beta2": "AdamW beta2",
    "--adam-eps": "AdamW epsilon",
    "--skip-memory-check": "start even when the pre-flight's estimate (dchag/planner: parameters, optimizer state, "
                           "activations and the batch, per rank) exceeds the memory of this machine's GPU or host "
                           "(only if you know the estimate is wrong for your run)",
    "--seed": "seed of the weights, MAE masks, dropout and data order (the same for every layout)",
    # fine-tuning
    "--finetune": "start from --pretrained-checkpoint's weights only: iteration 0, a fresh optimizer and LR schedule, "
                  "this run's layout, channels, tile size and task (README, 'Fine-tune a pretrained model'). The "
                  "architecture flags not given take the pretrained model's values. With --load DIR holding a "
                  "checkpoint the run resumes from DIR instead (--load DIR --save DIR works across restarts)",
    "--pretrained-checkpoint": "with --finetune: the pretrained model, a consolidated export "
                               "(tools/convert_checkpoint.py --format consolidated) or a checkpoint folder --save "
                               "wrote (or one of its iter_NNNNNNN folders), of any T and P. Channels are matched by "
                               "name, then wavelength (interpolated between the two nearest pretrained bands); the "
                               "rest start new; a start-up table lists what was loaded, interpolated, new and dropped",
    "--freeze-encoder": "with --finetune: a linear probe: only the task head (and forecast's lead-time embedding, "
                        "MAE's mask token) train; the channel stage, the aggregation and the backbone stay as loaded, "
                        "and the optimizer holds only what trains",
    "--new-params-lr-mult": "with --finetune: the new and interpolated parameters train at this multiple of the "
                            "schedule's rate (megatron-style lr_mult groups). The unit is the tensor: a tensor with "
                            "any new or interpolated row (e.g. the tokenizer when one band is new) gets it whole, "
                            "because AdamW's step does not scale with a per-row gradient factor. Multiplies "
                            "--dchag-partial-lr-mult",
    "--match-channels": "with --finetune (and between the sources of a blended --data-path): which identity stands when a channel's name matches a pretrained channel "
                        "whose wavelength lies further away than the bands' width (20 nm where unknown), e.g. 'B05' "
                        "at 865 nm against 'B05' at 705 nm: name (the name match is taken) or wavelength (the name is "
                        "ignored for that channel: matched, interpolated or new by its wavelength). Not given: such a "
                        "contradiction is refused at start-up, naming both channels",
    "--lora-rank": "with --finetune: R > 0 adds LoRA adapters (y = W x + alpha/R B A x, B zero at the start) to "
                   "megatron-core's tensor-parallel linears named by --lora-targets, split like them over "
                   "--tensor-model-parallel-size; the pretrained weights they adapt are frozen. What trains: the "
                   "adapters, the task head and conditioning, and every tensor the fine-tune made new or "
                   "interpolated (whole tensors; the start-up table lists them with the trainable share). The "
                   "export merges the adapters into the weights (README, 'LoRA')",
    "--lora-alpha": "LoRA's alpha: the adapters' output is scaled by alpha / --lora-rank (default: the rank, scale 1)",
    "--lora-dropout": "dropout on the adapters' input (a function of seed, sample, iteration and position: the same "
                      "masks on every layout)",
    "--lora-targets": "comma list of the linears to adapt: qkv, proj (attention), fc1, fc2 (MLP) of every backbone "
                      "layer, and final.kv, final.proj (the final aggregation); default qkv,proj,fc1,fc2",
    # checkpointing and logging
    "--save": "folder for checkpoints (DIR/iter_NNNNNNN, DIR/latest); never overwrites a complete checkpoint "
              "beyond the starting iteration",
    "--load": "folder to resume from (the iteration in DIR/latest); --load DIR --save DIR on an empty DIR starts "
              "fresh",
    "--allow-data-change": "resume although the data differs from the data the checkpoint was trained on (its "
                           "fingerprint: sizes, shapes, channels, sample counts, a digest of fixed windows); the "
                           "new data is normalized with the checkpoint's statistics. Without it such a resume is "
                           "refused, naming what changed",
    "--save-interval": "save every this many iterations (and at the end)",
    "--eval-interval": "validate every this many iterations",
    "--eval-iters": "validation iterations (global batches) per evaluation; default: every held-out sample, each "
                    "once (the last batch padded with samples that weigh nothing); fewer scores the first "
                    "--eval-iters x global batch held-out samples, and the validation line says how many of how many",
    "--log-interval": "print the log line and write TensorBoard scalars every this many iterations",
    "--tensorboard-dir": "TensorBoard log folder (rank 0 writes it)",
    # deepspeed
    "--deepspeed": "use DeepSpeed (always on; accepted for the usual DeepSpeed command line)",
    "--deepspeed_config": "DeepSpeed JSON (ZeRO stage, bf16, ...; see ds_configs/); checked before anything is "
                          "built",
    "--local_rank": "set by the deepspeed launcher",
}


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults appended, except None (= not given: the help says what happens) and store_true's False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def apply(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.formatter_class = Formatter
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = HELP.get(action.option_strings[0])
    return parser
