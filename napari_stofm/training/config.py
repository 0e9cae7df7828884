"""The settings of a pretraining run: :class:`PretrainConfig` (every hyper-parameter of both
stages, the model's sizes and the output name), which of them a resumed run may change, and
where a run keeps its resumable state (``OUT/state/``). Plain Python, no torch: the
``stofm pretrain`` command reads its defaults from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

STATE_DIR = "state"
#: settings a resumed run may change (the model's shapes and the vocabulary stay)
RESUME_OVERRIDABLE = ("train_split_num", "batch_subslices", "batch_cells", "stage1_share", "crop_prob",
                      "subsample_min", "contrastive_weight", "profile_weight", "pair_weight", "device",
                      "loader_threads", "niche_weight", "self_weight", "neighbour_weight", "neighbour_temperature",
                      "lr2", "readout")


@dataclass
class PretrainConfig:
    """Hyper-parameters of a pretraining run (all sizes small enough for a CPU)."""

    seed: int = 0
    threads: int = 2
    loader_threads: int = 0  # threads building the next batches while the model trains (0: in line)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", "mps" or "auto" (the GPU when there is one)
    # time and steps
    stage1_steps: int = 1000
    stage2_steps: int = 2000
    minutes: Optional[float] = None  # wall-clock budget of one call (both stages)
    stage1_share: float = 0.4  # part of ``minutes`` stage 1 may use
    checkpoint_minutes: float = 3.0
    # stage 1: gene scale
    max_genes: int = 255
    batch_cells: int = 32
    lr1: float = 1e-3
    mask_prob: float = 0.15
    profile_weight: float = 1.0
    contrastive_weight: float = 0.1
    gene_dropout: float = 0.25
    temperature: float = 0.1
    # stage 2: SE(2)
    train_split_num: int = 400
    batch_subslices: int = 4
    lr2: float = 5e-4
    # the input vector of a masked cell token (every component); -100 as in the published code
    cell_mask_value: float = -100.0
    cell_mask_prob: float = 0.12
    cell_keep_prob: float = 0.03
    pair_weight: float = 1.0
    noise_spacings: float = 5.0
    # niche prediction: from every cell token's output, ``niche_head`` predicts the mean input
    # embedding of the cell's ``niche_neighbours`` nearest cells (itself excluded) at each of
    # those scales, centred (cosine loss). 0 (the default, the recipe of the bundled weights)
    # turns it off; the v3 attempt in the model card used 2.0 (with self_weight 0.5)
    niche_weight: float = 0.0
    niche_neighbours: Tuple[int, ...] = (10, 40)
    # every unmasked cell token's output also reconstructs its own input (``lm_head``, cosine):
    # the output keeps the cell's state beside its niche; 0 (default) scores only the masked cells
    self_weight: float = 0.0
    # spatial agreement: every cell token's output (the hidden state X_stofm is read from,
    # L2-normalised) must pick out one of its ``neighbour_k`` nearest cells among the other
    # cells of its sub-slice (InfoNCE at ``neighbour_temperature``), so that the output's whole
    # geometry, not a head's reading of it, varies with the niche; 0 (default) turns it off
    neighbour_weight: float = 0.0
    neighbour_k: int = 10
    neighbour_temperature: float = 0.1
    # what the exported stofm.json reads X_stofm from (napari_stofm.model.readout): "hidden"
    # (default, published) or "context" (the trained lm_head and niche_head; needs niche_weight > 0)
    readout: str = "hidden"
    crop_prob: float = 0.5
    min_crop: float = 0.5
    subsample_min: float = 0.7
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # sizes
    bert_hidden: int = 128
    bert_layers: int = 2
    bert_heads: int = 4
    bert_intermediate: int = 256
    # attention-probability dropout of both transformers while training: 0 lets SDPA use its
    # fused kernels (with dropout the CPU falls back to the math path, about 4x slower)
    attention_dropout: float = 0.0
    # hidden and activation dropout of both transformers while training (0.1, BERT's and the
    # published SE(2) value); 0 makes a run deterministic given its batches, which is how a
    # multi-process run reproduces one process's losses
    dropout: float = 0.1
    se2_layers: int = 4
    se2_dim: int = 128
    se2_ffn: int = 256
    se2_heads: int = 8
    se2_gaussians: int = 64
    # the SE(2) transformer's attention scope (SToFMConfig.attention_scope): "all" (published)
    # or "neighbours" (each cell attends to its nearest cells, the virtual cells and CLS only)
    se2_attention: str = "all"
    min_cells_per_gene: int = 10
    # start from this checkpoint directory (its vocabulary, sizes, cell encoder, SE(2) transformer
    # and pretraining heads) instead of a random model; with stage1_steps=0 only stage 2 trains
    init_from: Optional[str] = None
    # output
    name: str = "napari-stofm-small"
    split_num: int = 1000  # inference sub-slice size written into stofm.json
    # gene windows per cell written into stofm.json (PipelineSettings.gene_windows); a run
    # started from a checkpoint keeps that checkpoint's value
    gene_windows: int = 1

    @classmethod
    def from_dict(cls, data: dict) -> "PretrainConfig":
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if "niche_neighbours" in values:  # a list once written to JSON
            values["niche_neighbours"] = tuple(int(k) for k in values["niche_neighbours"])
        return cls(**values)
