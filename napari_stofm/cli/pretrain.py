"""``stofm pretrain``: train SToFM weights on your own slices (see ``stofm pretrain --help``)."""
from __future__ import annotations

import argparse
import logging
import sys

from napari_stofm.cli.app import _EXTENSIONS, bounded_float, command, nonnegative_int, positive_int

_DESCRIPTION = """\
Train SToFM weights from spatial-transcriptomics slices (.h5ad files with cell positions in
obsm['spatial'] and expression in X), on the CPU or a GPU. Two stages, as in the SToFM paper:
first the gene-scale cell encoder learns to fill in hidden genes of each cell and to summarise
the cell's gene profile in its embedding (plus a small contrastive term), then the SE(2)
transformer learns to fill in hidden cells and jittered cell distances from the
spatial context, with the cell encoder frozen. The result is a checkpoint folder that
`stofm embed/predict --checkpoint OUT` and napari_stofm.load_model(OUT) read, with a loss curve
(loss_curve.png) and the full loss history (training_log.json).

Slices that the shared data README keeps for evaluation (held out) are skipped when found in a
--data folder and refused when named directly.

Example (about 40 minutes on 2 CPU cores):
  stofm pretrain --data ../shared/data -o my_weights --minutes 40

Stopped early? Run the same command again with --resume: training continues from the last
periodic checkpoint in OUT/state/.

Training on another machine (a GPU node with PyTorch but without the scverse stack): pack the
slices once, where they can be read, then train from the pack:
  stofm pretrain --data ../shared/data --pack corpus.npz
  stofm pretrain --data corpus.npz -o my_weights --device cuda --batch-cells 512 --loader-threads 4

Pretraining on several processes or GPUs: start the same command with torchrun, one process per
GPU (or per group of CPU cores), e.g.
  torchrun --standalone --nproc_per_node=4 -m napari_stofm.cli pretrain --data corpus.npz -o my_weights \\
      --device cuda --batch-cells 512
(`torchrun ... $(which stofm) pretrain ...` works too). The processes train one model together
(DistributedDataParallel: nccl on GPUs, process LOCAL_RANK on cuda:LOCAL_RANK; gloo on the CPU).
--batch-cells and --batch-subslices stay the global batch: each process draws the same seeded
batch and trains on its 1/N share of it, so both must be multiples of N, and N processes take
the steps one process would take, on the same batches. Only process 0 writes the checkpoints,
the trained weights and the loss log; --resume works the same way (OUT must be on a file system
every process reads).
"""


def _add_parser(sub) -> None:
    from napari_stofm.training.config import PretrainConfig

    d = PretrainConfig()
    p = sub.add_parser("pretrain", help="train SToFM weights on slices (CPU, resumable)",
                       description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, metavar="DIR_OR_FILE",
                   help="slice files (.h5ad) and/or folders searched for them (recursively)")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", metavar="OUT",
                     help="folder for the trained checkpoint (created; its state/ subfolder allows --resume)")
    out.add_argument("--pack", metavar="FILE.npz",
                     help="do not train: read the slices, build the vocabulary and the gene tokens, and write them "
                     "to FILE.npz, which --data then accepts on a machine without anndata")
    p.add_argument("--exclude-held-out", action=argparse.BooleanOptionalAction, default=True,
                   help="skip / refuse the evaluation slices listed in the data README (default: on)")
    p.add_argument("--stage1-steps", type=nonnegative_int("stage-1 steps"), default=d.stage1_steps,
                   help=f"training steps of the gene-scale encoder (default: {d.stage1_steps})")
    p.add_argument("--stage2-steps", type=nonnegative_int("stage-2 steps"), default=d.stage2_steps,
                   help=f"training steps of the SE(2) transformer (default: {d.stage2_steps})")
    p.add_argument("--minutes", type=bounded_float("minutes", minimum=0.0, exclusive_minimum=True), default=None,
                   help="wall-clock budget for this call; stage 1 may use --stage1-share of it and each stage stops "
                   "early when its share is spent (default: no limit, the step counts decide)")
    p.add_argument("--stage1-share", type=bounded_float("stage-1 share", minimum=0.0, maximum=1.0),
                   default=d.stage1_share,
                   help=f"part of --minutes given to stage 1 (default: {d.stage1_share})")
    p.add_argument("--seed", type=nonnegative_int("random seed"), default=d.seed,
                   help=f"random seed (default: {d.seed})")
    p.add_argument("--resume", action="store_true", help="continue the run saved in OUT/state/")
    p.add_argument("--threads", type=positive_int("CPU threads"), default=d.threads,
                   help=f"CPU threads for torch (default: {d.threads})")
    p.add_argument("--loader-threads", type=nonnegative_int("loader threads"), default=0,
                   help="threads that build the next batches while the model trains; worth it on a GPU "
                   "(e.g. 4), not on a small CPU (default: 0, built in line; the batches are the same either way)")
    p.add_argument("--device", default="auto",
                   help="where to train: cpu, cuda, cuda:N, mps, or auto = the GPU when there is one (default: auto)")
    p.add_argument("--checkpoint-minutes",
                   type=bounded_float("checkpoint minutes", minimum=0.0, exclusive_minimum=True),
                   default=d.checkpoint_minutes,
                   help=f"save a resumable checkpoint this often (default: {d.checkpoint_minutes})")
    p.add_argument("--name", default=d.name, help=f"model name written into stofm.json (default: {d.name})")
    g = p.add_argument_group("sizes and batches (defaults suit a CPU)")
    g.add_argument("--max-genes", type=positive_int("genes per cell"), default=d.max_genes,
                   help="genes per cell, top of the rank order, in training and later embedding "
                        f"(default: {d.max_genes})")
    g.add_argument("--batch-cells", type=positive_int("cells per stage-1 step"), default=d.batch_cells,
                   help=f"cells per stage-1 step (default: {d.batch_cells})")
    g.add_argument("--train-split-num", type=positive_int("cells per training sub-slice"), default=None,
                   help=f"cells per training sub-slice in stage 2 (default: {d.train_split_num}; may be changed "
                   "on --resume)")
    g.add_argument("--batch-subslices", type=positive_int("sub-slices per stage-2 step"), default=None,
                   help=f"sub-slices per stage-2 step (default: {d.batch_subslices}; may be changed on --resume)")
    g.add_argument("--bert-hidden", type=positive_int("cell encoder width"), default=d.bert_hidden,
                   help=f"cell encoder width (default: {d.bert_hidden})")
    g.add_argument("--bert-layers", type=positive_int("cell encoder layers"), default=d.bert_layers,
                   help=f"cell encoder layers (default: {d.bert_layers})")
    g.add_argument("--se2-dim", type=positive_int("SE(2) transformer width"), default=d.se2_dim,
                   help=f"SE(2) transformer width E (default: {d.se2_dim})")
    g.add_argument("--se2-attention", choices=("all", "neighbours"), default=d.se2_attention,
                   help="which tokens each SE(2) token attends to: all (as published) or neighbours (its nearest "
                        f"cells, the virtual cells and CLS) (default: {d.se2_attention})")
    g.add_argument("--se2-layers", type=positive_int("SE(2) transformer layers"), default=d.se2_layers,
                   help=f"SE(2) transformer layers (default: {d.se2_layers})")
    g.add_argument("--se2-heads", type=positive_int("SE(2) attention heads"), default=d.se2_heads,
                   help=f"SE(2) attention heads (default: {d.se2_heads})")
    g.add_argument("--profile-weight", type=bounded_float("profile weight", minimum=0.0), default=d.profile_weight,
                   help=f"weight of the stage-1 profile-reconstruction term (default: {d.profile_weight})")
    g.add_argument("--contrastive-weight", type=bounded_float("contrastive weight", minimum=0.0),
                   default=d.contrastive_weight,
                   help=f"weight of the stage-1 contrastive term, 0 to switch it off (default: {d.contrastive_weight})")
    g.add_argument("--niche-weight", type=bounded_float("niche weight", minimum=0.0), default=d.niche_weight,
                   help="weight of the stage-2 niche term (each cell's output predicts its neighbours' mean "
                        f"embedding), 0 to switch it off (default: {d.niche_weight})")
    g.add_argument("--self-weight", type=bounded_float("self weight", minimum=0.0), default=d.self_weight,
                   help="weight of the stage-2 term that has every unmasked cell's output reconstruct its own "
                        f"embedding (default: {d.self_weight})")
    g.add_argument("--neighbour-weight", type=bounded_float("neighbour weight", minimum=0.0),
                   default=d.neighbour_weight,
                   help="weight of the stage-2 spatial-agreement term (each cell's output must pick out one of "
                        "its nearest cells among the other cells of its sub-slice), 0 to switch it off "
                        f"(default: {d.neighbour_weight})")
    g.add_argument("--neighbour-temperature", type=bounded_float("neighbour temperature", minimum=0.0,
                                                                 exclusive_minimum=True),
                   default=d.neighbour_temperature,
                   help=f"temperature of the spatial-agreement term (default: {d.neighbour_temperature})")
    g.add_argument("--readout", choices=("hidden", "context"), default=d.readout,
                   help="what the weights' obsm['X_stofm'] is read from: the SE(2) transformer's hidden state "
                        "(hidden, as published) or its cell and niche heads (context; needs --niche-weight > 0) "
                        f"(default: {d.readout})")
    g.add_argument("--lr2", type=bounded_float("stage-2 learning rate", minimum=0.0, exclusive_minimum=True),
                   default=d.lr2, help=f"peak learning rate of stage 2 (default: {d.lr2})")
    g.add_argument("--warmup-steps", type=nonnegative_int("warm-up steps"), default=d.warmup_steps,
                   help=f"linear warm-up steps of each stage (default: {d.warmup_steps})")
    g.add_argument("--dropout", type=bounded_float("dropout", minimum=0.0, maximum=0.99), default=d.dropout,
                   help="hidden and activation dropout of both transformers while training; 0 makes a run "
                        f"reproducible from its batches alone (default: {d.dropout})")
    g.add_argument("--cell-mask-value", type=float, default=d.cell_mask_value,
                   help="the input value of a masked cell token in stage 2 (the v2 recipe: -100; "
                        f"default: {d.cell_mask_value})")
    p.add_argument("--init-from", metavar="CHECKPOINT_DIR", default=None,
                   help="start from this checkpoint (its vocabulary, sizes and weights; 'bundled' for the "
                        "bundled weights); with --stage1-steps 0 only the SE(2) stage trains")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


_EXTENSIONS.append(_add_parser)


@command("pretrain")
def cmd_pretrain(args) -> int:
    from napari_stofm.training import PretrainConfig, pack_corpus, pretrain
    from napari_stofm.training.distributed import launched_rank

    main_process = launched_rank() == 0  # under torchrun, process 0 alone reports
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)
    d = PretrainConfig()
    if args.pack:
        path = pack_corpus(args.data, args.pack, max_genes=args.max_genes, exclude_held_out=args.exclude_held_out)
        from napari_stofm.training.packed import describe, load_packed_corpus

        if main_process:
            print(f"packed corpus written to {path}: {describe(load_packed_corpus(path))}", file=sys.stderr)
        return 0
    given = [k for k in ("train_split_num", "batch_subslices") if getattr(args, k) is not None]
    cfg = PretrainConfig(
        seed=args.seed, threads=args.threads, stage1_steps=args.stage1_steps, stage2_steps=args.stage2_steps,
        minutes=args.minutes, stage1_share=args.stage1_share, checkpoint_minutes=args.checkpoint_minutes,
        max_genes=args.max_genes, batch_cells=args.batch_cells,
        train_split_num=args.train_split_num if args.train_split_num is not None else d.train_split_num,
        batch_subslices=args.batch_subslices if args.batch_subslices is not None else d.batch_subslices,
        bert_hidden=args.bert_hidden, bert_layers=args.bert_layers,
        se2_dim=args.se2_dim, se2_layers=args.se2_layers, se2_heads=args.se2_heads, se2_attention=args.se2_attention,
        contrastive_weight=args.contrastive_weight,
        profile_weight=args.profile_weight, name=args.name, device=args.device,
        loader_threads=args.loader_threads, niche_weight=args.niche_weight, self_weight=args.self_weight,
        neighbour_weight=args.neighbour_weight, neighbour_temperature=args.neighbour_temperature,
        readout=args.readout,
        init_from=args.init_from, cell_mask_value=args.cell_mask_value, lr2=args.lr2,
        warmup_steps=args.warmup_steps, dropout=args.dropout,
    )
    out = pretrain(args.data, args.output, cfg, resume=args.resume, exclude_held_out=args.exclude_held_out,
                   show_progress=not args.quiet, resume_overrides=given)
    if main_process:
        print(f"weights written to {out} (loss curve: {out / 'loss_curve.png'})", file=sys.stderr)
    return 0
