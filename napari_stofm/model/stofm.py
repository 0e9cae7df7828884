"""A loaded SToFM model: gene vocabulary + cell encoder + SE(2) transformer + settings.

A checkpoint directory holds::

    config.json                      SE(2) transformer configuration (published keys)
    se2transformer.pth|.safetensors  SE(2) transformer weights
    cell_encoder/cell_bert/          BERT cell encoder (Hugging Face BertModel layout)
    cell_encoder/cell_proj.bin|.safetensors
    vocabulary.tsv                   gene vocabulary + rank-value normalisation factors
      or token_dictionary.{json,pkl} + gene_median_dictionary.{json,pkl} (Geneformer's)
    stofm.json                       (optional) pipeline settings and provenance

The published checkpoint loads unchanged; with it, the published sub-slice split is used.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from napari_stofm.errors import CheckpointError
from napari_stofm.genes.vocabulary import GeneVocabulary
from napari_stofm.model.cell_encoder import CellEncoder
from napari_stofm.model.checkpoint import (
    find_se2_weights,
    fingerprint_files,
    load_se2_transformer,
    save_se2_transformer,
)
from napari_stofm.model.readout import READOUTS, ContextReadout
from napari_stofm.model.se2_transformer import SE2Transformer

BUNDLED_DIR = Path(__file__).parent / "bundled"
SETTINGS_NAME = "stofm.json"
VOCABULARY_NAME = "vocabulary.tsv"
#: how crowded squares are split into sub-slices (see :func:`~napari_stofm.model.multiscale.split_subslices`)
SPLIT_MODES = ("published", "spatial")
#: upper bounds of the pipeline settings read from a checkpoint: far above any real use
#: (published: 1000 cells per sub-slice, 200 virtual cells, 2047 genes), so that a corrupt
#: value is refused instead of read as a size (a sub-slice never holds more cells than the
#: slice, so split_num does not bound memory by itself; max_genes and max_hypernodes set
#: sequence lengths)
MAX_SPLIT_NUM = 1_000_000
MAX_HYPERNODES = 10_000
MAX_GENES = 1_000_000


@dataclass
class PipelineSettings:
    """How a slice is cut and summarised before the SE(2) stage (published defaults)."""

    split_num: int = 1000
    split_mode: str = "published"
    hypernode_alpha: float = 0.2
    hypernode_resolution: float = 1.0
    max_hypernodes: int = 200
    max_genes: int = 2047
    #: a cell with more than ``max_genes`` genes is read as up to this many rank-interleaved
    #: windows of ``max_genes`` genes, their embeddings averaged (1: the top ``max_genes`` only,
    #: as published; see :meth:`~napari_stofm.genes.tokenizer.TokenizedCells.interleaved`)
    gene_windows: int = 1
    #: what ``obsm['X_stofm']`` is read from (see :mod:`napari_stofm.model.readout`): the last
    #: hidden state (``"hidden"``, published) or the stage-2 heads' cell and niche (``"context"``)
    readout: str = "hidden"
    name: str = "SToFM"
    info: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from napari_stofm.checks import integer, number

        kw = dict(error=CheckpointError, where=f"pipeline settings ({SETTINGS_NAME})")
        self.split_num = integer(self.split_num, "split_num", minimum=1, maximum=MAX_SPLIT_NUM,
                                 fix="cells per sub-slice, 1000 in the published model", **kw)
        if not isinstance(self.split_mode, str) or self.split_mode not in SPLIT_MODES:
            raise CheckpointError(f"pipeline settings ({SETTINGS_NAME}): split_mode={self.split_mode!r} is not one "
                                  f"of {', '.join(SPLIT_MODES)}")
        self.hypernode_alpha = number(self.hypernode_alpha, "hypernode_alpha", minimum=0.0, maximum=1.0, **kw)
        self.hypernode_resolution = number(self.hypernode_resolution, "hypernode_resolution", minimum=0.0,
                                           exclusive_minimum=True, **kw)
        self.max_hypernodes = integer(self.max_hypernodes, "max_hypernodes", minimum=1, maximum=MAX_HYPERNODES, **kw)
        self.max_genes = integer(self.max_genes, "max_genes", minimum=1, maximum=MAX_GENES,
                                 fix="genes per cell read by the cell encoder, 2047 in the published model", **kw)
        self.gene_windows = integer(self.gene_windows, "gene_windows", minimum=1, maximum=64,
                                    fix="windows of max_genes genes read per cell, 1 in the published model", **kw)
        if not isinstance(self.readout, str) or self.readout not in READOUTS:
            raise CheckpointError(f"pipeline settings ({SETTINGS_NAME}): readout={self.readout!r} is not one of "
                                  f"{', '.join(READOUTS)}")
        if not isinstance(self.name, str):
            raise CheckpointError(f"pipeline settings ({SETTINGS_NAME}): name must be a string, got {self.name!r}")
        if not isinstance(self.info, dict):
            raise CheckpointError(f"pipeline settings ({SETTINGS_NAME}): info must be a JSON object, "
                                  f"got {type(self.info).__name__}")

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "PipelineSettings":
        if not isinstance(data, dict):
            raise CheckpointError(f"pipeline settings ({SETTINGS_NAME}) must be a JSON object of settings, "
                                  f"found {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "PipelineSettings":
        """Read ``stofm.json``; every problem is a :class:`CheckpointError` naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}): fix or delete it (without it the published "
                                  "settings are used)") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {path} ({exc})") from None
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}: fix it, or delete it to use the published settings") from None


class SToFM:
    """Everything needed to embed a slice. Use :func:`load_model` to get one."""

    def __init__(
        self,
        se2: SE2Transformer,
        cell_encoder: CellEncoder,
        vocabulary: GeneVocabulary,
        settings: Optional[PipelineSettings] = None,
        *,
        source: str = "in memory",
        fingerprint: Optional[str] = None,
        readout: Optional[ContextReadout] = None,
    ):
        if cell_encoder.embedding_dim != se2.config.input_dim:
            raise CheckpointError(
                f"the cell encoder gives {cell_encoder.embedding_dim}-d embeddings but the SE(2) transformer "
                f"takes input_dim={se2.config.input_dim}; use a cell encoder and transformer trained together"
            )
        self.se2 = se2.eval()
        self.cell_encoder = cell_encoder.eval()
        self.vocabulary = vocabulary
        self.settings = settings or PipelineSettings()
        if self.settings.readout == "context" and readout is None:
            raise CheckpointError("readout 'context' needs the SE(2) stage's readout heads; none were given")
        #: the heads ``obsm['X_stofm']`` is read through (``readout: context``), else None
        self.readout = readout.eval() if readout is not None and self.settings.readout == "context" else None
        self.source = source
        extra = [self.readout] if self.readout is not None else []
        self.fingerprint = fingerprint or _state_fingerprint(se2, cell_encoder, *extra)

    @property
    def representation_dim(self) -> int:
        """Numbers per cell in ``obsm['X_stofm']``."""
        return self.readout.dim if self.readout is not None else self.se2.config.embedding_dim

    def __repr__(self) -> str:
        cfg = self.se2.config
        return (
            f"SToFM({self.settings.name!r}, {cfg.num_hidden_layers} layers, E={cfg.embedding_dim}, "
            f"heads={cfg.num_attention_heads}, vocabulary={self.vocabulary.n_genes} genes, from {self.source})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.se2.parameters()).device

    def cell_encoder_in(self, precision: str = "float32") -> CellEncoder:
        """The cell encoder computing in ``precision`` (see :data:`PRECISIONS`): itself for
        float32, else a converted copy made once per model."""
        check_precision(precision)
        if precision == "float32":
            return self.cell_encoder
        reduced = self.__dict__.setdefault("_reduced_encoders", {})
        if precision not in reduced:
            import copy

            reduced[precision] = copy.deepcopy(self.cell_encoder).to(getattr(torch, precision)).eval()
        return reduced[precision]

    def to(self, device) -> "SToFM":
        """Move this model (in place) to ``device``."""
        self.se2.to(device)
        self.cell_encoder.to(device)
        if self.readout is not None:
            self.readout.to(device)
        return self

    def on(self, device) -> "SToFM":
        """This model on ``device``: itself when it is there already, else a moved copy
        (the original stays where it is, so a worker thread never moves a shared model)."""
        device = torch.device(device)
        current = self.device
        if current.type == device.type and (device.index is None or current.index == device.index):
            return self
        import copy

        readout = copy.deepcopy(self.readout).to(device) if self.readout is not None else None
        return SToFM(copy.deepcopy(self.se2).to(device), copy.deepcopy(self.cell_encoder).to(device),
                     self.vocabulary, self.settings, source=self.source, fingerprint=self.fingerprint,
                     readout=readout)

    @classmethod
    def load(cls, path: str | Path, device: Optional[str] = None) -> "SToFM":
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint directory {path} does not exist")
        se2, heads = load_se2_transformer(path, return_heads=True)
        encoder = CellEncoder.from_pretrained(path)
        vocabulary = _load_vocabulary(path)
        settings_file = path / SETTINGS_NAME
        settings = PipelineSettings()
        if settings_file.is_file():
            settings = PipelineSettings.from_json(settings_file)
        readout = None
        if settings.readout == "context":
            readout = ContextReadout.from_heads(heads, se2.config.embedding_dim, se2.config.input_dim,
                                                str(find_se2_weights(path)))
        files = [find_se2_weights(path), path / "config.json"] + sorted((path / "cell_encoder").rglob("*.*"))
        model = cls(se2, encoder, vocabulary, settings, source=str(path), fingerprint=fingerprint_files(files),
                    readout=readout)
        if device is not None:
            model.to(resolve_device(device))
        return model

    def save(self, path: str | Path) -> Path:
        """Write our layout (safetensors + config + vocabulary + settings)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_se2_transformer(self.se2, path, heads=self.readout.state_dict() if self.readout is not None else None)
        self.cell_encoder.save_pretrained(path / "cell_encoder")
        self.vocabulary.save(path / VOCABULARY_NAME)
        (path / SETTINGS_NAME).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")
        return path


def _load_vocabulary(path: Path) -> GeneVocabulary:
    for folder in (path, path / "cell_encoder"):
        if (folder / VOCABULARY_NAME).is_file():
            return GeneVocabulary.load(folder / VOCABULARY_NAME)
        for ext in (".json", ".pkl"):
            tokens = folder / f"token_dictionary{ext}"
            medians = folder / f"gene_median_dictionary{ext}"
            if tokens.is_file() and medians.is_file():
                return GeneVocabulary.from_geneformer(tokens, medians)
    raise CheckpointError(
        f"{path} has no gene vocabulary: add {VOCABULARY_NAME}, or Geneformer's token_dictionary and "
        "gene_median_dictionary (.json or .pkl) next to config.json"
    )


def _state_fingerprint(*modules: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``None``/``'auto'``: CUDA when available, else CPU. ``'cuda'`` without CUDA is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        from napari_stofm.errors import StofmInputError

        raise StofmInputError(f"device={device!r} is not a device: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("device 'cuda' was asked for but no CUDA GPU is available here: use device='cpu'")
    return dev


#: arithmetic of the cell encoder: ``bfloat16`` runs its matrix products at about twice the
#: float32 rate on CPUs with AVX-512 BF16 / AMX and on recent GPUs (its effect on the
#: embeddings is measured by ``benchmarks/bench_precision.py``); float32 is the default.
PRECISIONS = ("float32", "bfloat16")


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        from napari_stofm.errors import StofmInputError

        raise StofmInputError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


#: batch sizes on a CPU: sub-slices per SE(2) pass, cells per cell-encoder pass
CPU_BATCHES = (4, 64)


def batch_sizes(model: "SToFM", tokens_per_subslice: int = 1201) -> tuple[int, int]:
    """``(sub-slices, cells)`` per forward pass for the model's device.

    CPU: :data:`CPU_BATCHES` (larger batches are no faster on a few cores). CUDA: sized to
    the free GPU memory, a quarter of it for the SE(2) stage's ``(B, heads, L, L)`` float32
    tensors (about six live at once) and the cell encoder's ``(B, heads, 256, 256)``
    attention plus activations; between 4 and 64 sub-slices, 64 and 4,096 cells.
    """
    device = model.device
    if device.type != "cuda":
        return CPU_BATCHES
    free, _total = torch.cuda.mem_get_info(device)
    budget = free / 4
    heads = model.se2.config.num_attention_heads
    per_subslice = 6 * heads * tokens_per_subslice**2 * 4
    cfg = model.cell_encoder.config
    length = cfg["max_position_embeddings"]
    per_cell = 4 * (3 * cfg["num_attention_heads"] * length**2 + 8 * length * cfg["intermediate_size"])
    subslices = int(min(64, max(4, budget // per_subslice)))
    cells = int(min(4096, max(64, budget // per_cell)))
    return subslices, cells


def load_model(path: Optional[str | Path] = None, device: Optional[str] = None) -> SToFM:
    """Load a SToFM checkpoint directory; ``None`` loads the weights bundled with the package."""
    if path is None:
        if not (BUNDLED_DIR / "config.json").is_file():
            raise CheckpointError(
                "this installation has no bundled SToFM weights; pass the path of a checkpoint directory "
                "(config.json + se2transformer.pth + cell_encoder/ + vocabulary)"
            )
        path = BUNDLED_DIR
    return SToFM.load(path, device=device)


def build_model(
    vocabulary: GeneVocabulary,
    *,
    se2_config: Optional[Dict[str, Any]] = None,
    encoder_config: Optional[Dict[str, Any]] = None,
    settings: Optional[PipelineSettings] = None,
    seed: int = 0,
    readout_scales: int = 2,
) -> SToFM:
    """A randomly initialised SToFM for a vocabulary (the start of pretraining, and the
    untrained baseline). Sizes default to a small CPU-friendly model; settings with
    ``readout: context`` get random readout heads of ``readout_scales`` niche scales."""
    from napari_stofm.model.cell_encoder import BertConfig
    from napari_stofm.model.config import SToFMConfig

    torch.manual_seed(seed)
    enc = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
               max_position_embeddings=(settings or PipelineSettings()).max_genes + 1)
    enc.update(encoder_config or {})
    enc["vocab_size"] = vocabulary.size
    encoder = CellEncoder(BertConfig(**enc))
    se2_kw = dict(num_hidden_layers=4, embedding_dim=128, ffn_embedding_dim=256, num_attention_heads=8,
                  gaussian_hidden_dim=64)
    se2_kw.update(se2_config or {})
    se2_kw["input_dim"] = encoder.embedding_dim
    se2 = SE2Transformer(SToFMConfig(**se2_kw)).init_weights(seed=seed)
    settings = settings or PipelineSettings(split_mode="spatial")
    readout = None
    if settings.readout == "context":
        readout = ContextReadout(se2.config.embedding_dim, encoder.embedding_dim, readout_scales)
    return SToFM(se2, encoder, vocabulary, settings, source="random init", readout=readout)
