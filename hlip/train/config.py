"""Every knob of a training run in one flat, typed object.

A run is described by a TOML file (a preset shipped in ``hlip/configs/`` or one's own) plus
``key=value`` overrides;
:func:`load_config` merges them into a :class:`TrainConfig`, :meth:`TrainConfig.resolve`
fills what depends on other fields (the crop grid from the model preset), and the resolved
object is saved in the run directory so a checkpoint always knows how it was made.

The config is flat on purpose (as in nanoGPT): one name per knob, grouped below by stage,
so ``--set lr=3e-4`` and the TOML file use the same names.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from hlip import resources
from hlip.train.grouping import BATCH_GROUPINGS
from hlip.train.windows import REGION_WINDOWS, REGION_WORDS

TEXT_MODES = ("full", "shuffle", "sentence", "subset")
CT_WINDOW_MODES = ("scans", "mean")
PRECISIONS = ("fp32", "bf16")
NAN_POLICIES = ("raise", "skip")

HLIP_INTENSITY_MEAN = 0.449
"""Mean of the ImageNet channel means: HLIP normalises [0, 1] intensities with it."""
HLIP_INTENSITY_STD = 0.226
"""Mean of the ImageNet channel standard deviations, likewise."""


class ConfigError(ValueError):
    """A config that cannot run as written: an unknown key, a value of the wrong type or range."""


@dataclass
class TrainConfig:
    """All settings of one training run; field names are the TOML keys and ``--set`` names."""

    # --- data: where studies come from and which ones are used -----------------------------
    data: list[str] = field(default_factory=list)
    """Training shards: dataset directories, shard paths, globs, brace patterns
    (``ds-{000000..000009}.tar``) or anything webdataset opens (``pipe:``, ``https://``)."""
    data_version: int = 0
    """Version of the ``data`` datasets to read (docs/shard-format.md, "Versions"); 0 reads
    the latest. Pin it to reproduce a run on a dataset that has grown since."""
    val_data: list[str] = field(default_factory=list)
    """Validation shards for the periodic zero-shot evaluation (same forms as ``data``)."""
    shuffle_buffer: int = 64
    """Studies held in the shuffle buffer of each reader (0 = shard order)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (each reads its own part of the shards)."""
    prefetch_factor: int = 2
    batch_grouping: str = "none"
    """Micro-batches of one kind of study: "modality" (CT, MR, ...), "region" (modality and body
    region: head CT apart from chest CT) or "none" (stream order). Within one kind, the
    contrastive loss can tell studies apart only by what they show (hlip.train.grouping)."""
    mixed_batch_share: float = 0.0
    """With batch_grouping: the share of studies (drawn per study and epoch) batched in mixed
    batches instead of with their kind, so other kinds still appear as negatives."""
    filter_modality: list[str] = field(default_factory=list)
    """Keep only studies of these modalities (e.g. ``["CT"]``); empty = all."""
    filter_body_part: list[str] = field(default_factory=list)
    filter_min_scans: int = 1
    filter_labels: list[str] = field(default_factory=list)
    """Keep only studies whose labels include every one of these names."""
    filter_min_report_chars: int = 1
    """Studies whose report is shorter are dropped (a study without text cannot be paired)."""

    # --- per-study transform -------------------------------------------------------------------
    img_size: list[int] = field(default_factory=list)
    """Crop grid (d, h, w) in voxels; empty = the model preset's ``img_size``."""
    random_crop: bool = True
    """Training crops at random offsets (else centred, as evaluation always is)."""
    pad_to_size: bool = True
    """Pad scans smaller than ``img_size`` (else they stay smaller: packing accepts any size)."""
    max_scans: int = 8
    """Most scans fed per study (a random subset in training, the first ones in evaluation)."""
    ct_windows: list[list[float]] = field(default_factory=lambda: [[-1150.0, 350.0]])
    """CT windows [low, high] in HU mapped to [0, 1] for scans of no known region (or of a region
    without an entry in ``ct_region_windows``); HLIP's chest window is [-1150, 350]."""
    ct_region_windows: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(REGION_WINDOWS))
    """CT windows per body region ("head", "chest"), the region read from the study's
    BodyPartExamined or the scan's series description (hlip.train.windows); the head's are
    brain, subdural and bone windows."""
    ct_region: str = ""
    """Region assumed for CT scans whose metadata names none ("" = use ``ct_windows``)."""
    ct_window_mode: str = "scans"
    """With several windows: "scans" feeds each windowed copy as its own scan, "mean" averages."""
    mr_percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])
    """Non-CT scans: these percentiles of the cropped volume map to [0, 1]."""
    mr_ceiling: float = 1.0
    """Non-CT scans are clipped to [0, mr_ceiling] after that map: 1 clips at the upper
    percentile (HLIP); above 1, tissue brighter than the upper percentile stays brighter."""
    intensity_mean: float = HLIP_INTENSITY_MEAN
    intensity_std: float = HLIP_INTENSITY_STD
    text_mode: str = "sentence"
    """Training text: "full" report, "shuffle" its sentences, one random "sentence", or a random
    "subset" (about half) of its sentences in random order, drawn anew per step."""
    text_sections: list[str] = field(default_factory=list)
    """Report sections to train on, by heading (e.g. ["findings", "impression"]); empty = all text.
    A report with none of these headings is used whole."""
    text_prefix: str = ""
    """Prepended to every text, e.g. "This MRI study shows: " as HLIP does for brain MRI."""

    # --- model -----------------------------------------------------------------------------------
    model: str = "hlip-demo-cpu"
    """A name of ``hlip.model.factory.MODEL_PRESETS``."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """Overrides of the model preset passed to ``create_model``, e.g. ``{text = {context_length = 256}}``."""
    text_model: str = ""
    """Local directory of the Hugging Face text encoder (BiomedBERT, CXR-BERT); empty = the preset's."""
    init_checkpoint: str = ""
    """Weights to start from: an hlip-train checkpoint or an open_clip file (published HLIP)."""
    patch_drop_rate: float = 0.0
    grad_checkpointing: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0

    # --- optimisation --------------------------------------------------------------------------
    steps: int = 100
    """Optimizer steps of the whole run (0 = derive from ``epochs`` and the dataset size)."""
    epochs: float = 0.0
    """Used only when ``steps`` is 0: passes over the filtered training set."""
    batch_size: int = 8
    """Global batch: studies per optimizer step over all ranks and accumulation steps."""
    accum_steps: int = 1
    """Micro-batches per optimizer step (contrastive negatives come from one micro-batch)."""
    lr: float = 1e-4
    text_lr: float = 0.0
    """Peak learning rate of the pretrained text encoder's trainable layers; 0 = ``lr``. Fine-tuned
    at a from-scratch vision trunk's rate, an encoder loses what it knew (e.g. negation)."""
    min_lr: float = 0.0
    warmup_steps: int = 10
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    soft_targets: float = 0.0
    """CLIP loss only: share of each target given to the batch's reports by their similarity
    to the study's own (0 = one-hot; hlip.model.losses.ClipLoss says why)."""
    max_logit_scale: float = math.log(100.0)
    """CLIP's temperature clamp: logit_scale stays in [0, ln 100]."""
    precision: str = "bf16"
    """"bf16" autocasts the forward pass on GPU and on CPUs with bf16 matrix instructions (AMX,
    AVX512-BF16; other CPUs run fp32); "fp32" never does."""
    nan_policy: str = "raise"
    """On a non-finite loss or gradient: "raise" stops with the step and study keys, "skip" drops the step."""
    max_skipped_share: float = 0.1
    """Stop the run when more than this share of the studies read were skipped (damaged
    shards, failing transforms), checked from 100 studies read on (``loop.SKIP_CHECK_STUDIES``) and at the
    end; 1 never stops."""

    # --- GPU step: attention kernel, compilation, synchronisation checks ----------------------
    attention: str = "auto"
    """Attention backend of the vision trunk: "auto" (on CUDA the faster of varlen and xformers
    by a probe, else sdpa; sdpa on CPU), "sdpa", "varlen" (CUDA, bf16) or "xformers" (CUDA)."""
    compile: bool = False
    """``torch.compile`` the token-wise parts of every trunk block (rows marked dynamic, so a
    few graphs serve every batch; their count is logged as ``compiled_graphs``)."""
    compile_backend: str = "inductor"
    """The ``torch.compile`` backend (``inductor``; ``aot_eager`` checks the plumbing cheaply)."""
    sync_debug: bool = False
    """On CUDA, warn at every host synchronisation inside a step (``torch.cuda.set_sync_debug_mode``);
    the one read of loss and gradient norm per step, which decides the update, is not checked."""

    # --- run: output, logging, checkpoints, evaluation -----------------------------------------
    out: str = "runs/hlip"
    seed: int = 0
    device: str = "auto"
    """"auto" = the local CUDA device when there is one, else CPU."""
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    """Step checkpoints kept besides ``last.pt`` (oldest are deleted)."""
    log_keys: bool = False
    """Write every study key each rank trains on to ``keys-rank<R>.jsonl`` (audits exactly-once)."""
    progress: bool = True
    tensorboard: bool = True
    eval_every: int = 0
    """Run zero-shot evaluation on ``val_data`` every this many steps (0 = never)."""
    prompts: str = ""
    """Prompt file for the zero-shot evaluation (see docs/evaluation.md)."""
    eval_ground: str = "auto"
    """Shards whose reports ground the zero-shot prompts, as ``hlip-eval --ground``: "auto" =
    the training data, "none" = the prompts alone, or a shard directory."""
    find_unused_parameters: bool = False

    # ------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.out)

    def micro_batch_size(self, world_size: int) -> int:
        """Studies per forward pass on one rank."""
        per_rank, rest = divmod(self.batch_size, world_size * self.accum_steps)
        if rest or per_rank == 0:
            raise ConfigError(
                f"batch_size={self.batch_size} must be a positive multiple of "
                f"world_size x accum_steps = {world_size} x {self.accum_steps}"
            )
        return per_rank

    def validate(self) -> TrainConfig:
        """Reject values that would only fail later, deep inside a run."""
        checks = {
            "text_mode": (self.text_mode, TEXT_MODES),
            "ct_window_mode": (self.ct_window_mode, CT_WINDOW_MODES),
            "precision": (self.precision, PRECISIONS),
            "nan_policy": (self.nan_policy, NAN_POLICIES),
            "batch_grouping": (self.batch_grouping, BATCH_GROUPINGS),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ConfigError(f"{name}={value!r}: expected one of {allowed}")
        from hlip.model.attention import BACKENDS_NAMES

        if self.attention not in BACKENDS_NAMES:
            raise ConfigError(f"attention={self.attention!r}: expected one of {BACKENDS_NAMES}")
        if self.img_size and len(self.img_size) != 3:
            raise ConfigError(f"img_size={self.img_size}: expected [d, h, w]")
        window_sets = {"ct_windows": self.ct_windows}
        window_sets.update({f"ct_region_windows.{region}": w for region, w in self.ct_region_windows.items()})
        for name, windows in window_sets.items():
            if not windows or any(len(w) != 2 or w[0] >= w[1] for w in windows):
                raise ConfigError(f"{name}={windows}: expected a list of [low, high], low < high")
        if self.ct_region and self.ct_region not in REGION_WORDS:
            raise ConfigError(f"ct_region={self.ct_region!r}: expected one of {sorted(REGION_WORDS)} or ''")
        low, high = self.mr_percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"mr_percentiles={self.mr_percentiles}: expected 0 <= low < high <= 100")
        if not self.mr_ceiling >= 1:
            raise ConfigError(f"mr_ceiling={self.mr_ceiling}: expected >= 1")
        if not 0.0 <= self.mixed_batch_share <= 1.0:
            raise ConfigError(f"mixed_batch_share={self.mixed_batch_share}: expected a share in [0, 1]")
        if not 0.0 <= self.max_skipped_share <= 1.0:
            raise ConfigError(f"max_skipped_share={self.max_skipped_share}: expected a share in [0, 1]")
        if self.steps <= 0 and self.epochs <= 0:
            raise ConfigError("set steps (optimizer steps) or epochs")
        if self.max_scans < 1 or self.accum_steps < 1:
            raise ConfigError("max_scans and accum_steps must be >= 1")
        return self

    def resolve(self) -> TrainConfig:
        """Fill the fields that default to another source (the preset's crop grid)."""
        if not self.img_size:
            self.img_size = list(preset_img_size(self.model, self.model_overrides.get("vision", {})))
        return self.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a (possibly partial) mapping; unknown keys are an error, not a silent typo."""
        config = cls()
        for key, value in values.items():
            set_value(config, key, value)
        return config


@dataclass(frozen=True)
class ConfigField:
    """One config key as ``hlip-train config --list`` shows it."""

    name: str
    type: str
    default: Any
    doc: str


def config_fields() -> list[ConfigField]:
    """Every key of :class:`TrainConfig` with its type, default and docstring (read from the source)."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(TrainConfig)).body[0].body
    for statement, following in zip(body, body[1:], strict=False):
        if isinstance(statement, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[statement.target.id] = " ".join(str(following.value.value).split())
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig().to_dict()
    return [
        ConfigField(f.name, _type_name(hints[f.name]), defaults[f.name], docs.get(f.name, ""))
        for f in dataclasses.fields(TrainConfig)
    ]


def _type_name(kind: Any) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def preset_img_size(model_name: str, vision_overrides: dict[str, Any] | None = None) -> tuple[int, int, int]:
    """The crop grid (d, h, w) the model preset (with its vision overrides) was built for."""
    from hlip.model.factory import MODEL_PRESETS
    from hlip.model.presets import VISION_PRESETS

    if model_name not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {model_name!r}; known: {sorted(MODEL_PRESETS)}")
    vision = {**MODEL_PRESETS[model_name]["vision"], **(vision_overrides or {})}
    kwargs = {**VISION_PRESETS[vision["name"]], **vision}
    return tuple(int(s) for s in kwargs["img_size"])


# --- loading and overriding --------------------------------------------------------------------


def find_config_file(name_or_path: str) -> Path | Traversable:
    """A path to a TOML/JSON file, or the name of a shipped preset (``demo-cpu``)."""
    return resources.find_file(name_or_path, (resources.PRESETS,), "config")


def read_config_file(path: Path | Traversable) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    return json.loads(text) if path.name.endswith(".json") else tomllib.loads(text)


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Preset or file, then ``key=value`` overrides in order, then :meth:`TrainConfig.resolve`."""
    values = read_config_file(find_config_file(name_or_path)) if name_or_path else {}
    config = TrainConfig.from_dict(values)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        set_value(config, key.strip(), parse_value(raw.strip()))
    return config.resolve()


def parse_value(raw: str) -> Any:
    """A TOML literal when it parses as one (``3e-4``, ``true``, ``[1, 2]``), else the raw string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def set_value(config: TrainConfig, key: str, value: Any) -> None:
    """Set ``key`` (``name`` or ``dict_field.sub_key``) with the value coerced to the field's type."""
    name, _, sub_key = key.partition(".")
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints or name.startswith("_"):
        close = difflib.get_close_matches(name, [h for h in hints if not h.startswith("_")], n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (docs/training.md lists every key)"
        raise ConfigError(f"unknown config key {name!r}{hint}")
    if sub_key:
        if hints[name] != dict[str, Any]:
            raise ConfigError(f"{name!r} has no sub-keys (got {key!r})")
        getattr(config, name)[sub_key] = value
        return
    setattr(config, name, coerce(value, hints[name], name))


def coerce(value: Any, kind: Any, name: str) -> Any:
    """Coerce TOML/CLI values to a field type: a lone string becomes a one-item list, ints become floats."""
    origin = typing.get_origin(kind)
    if origin is list:
        (item_kind,) = typing.get_args(kind)
        items = value if isinstance(value, list | tuple) else [value]
        return [coerce(v, item_kind, name) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table, got {value!r}")
        return dict(value)
    if origin in (typing.Union, types.UnionType):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}")
    return value


def save_config(config: TrainConfig, run_dir: Path) -> Path:
    """Write the resolved config as ``config.json`` (loadable again with ``--config``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path
