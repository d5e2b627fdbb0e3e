"""Text tower and tokenizer: built-in MiniLM (offline), pooling, locking, checkpointing, local model dirs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from hlip.model.text import (
    TextTower,
    Tokenizer,
    default_text_model_dir,
    drop_measurements,
    load_text_config,
    split_sentences,
)

TINY_BERT = dict(
    vocab_size=30522,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@pytest.fixture(scope="module")
def minilm() -> TextTower:
    torch.manual_seed(0)
    return TextTower.from_pretrained(None, embed_dim=16, pooling="mean").eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(None, context_length=24)


def tiny_tower(pooling: str = "cls") -> TextTower:
    torch.manual_seed(0)
    return TextTower.from_config(BertConfig(**TINY_BERT), embed_dim=8, pooling=pooling)


def test_default_model_dir_is_the_packaged_minilm():
    path = default_text_model_dir()
    assert (path / "model.safetensors").is_file()
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 384


def test_tokenizer_pads_to_the_longest_text_and_truncates_to_context_length(tokenizer):
    tokens = tokenizer(["small nodule", "word " * 100])
    assert set(tokens) == {"input_ids", "attention_mask"}
    for value in tokens.values():
        assert value.dtype == torch.long and value.shape == (2, 24)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    n_real = len(tokenizer.tokenizer.tokenize("small nodule")) + 2  # [CLS] ... [SEP]
    assert mask[0].tolist() == [1] * n_real + [0] * (24 - n_real)
    assert (ids[0, n_real:] == tokenizer.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == tokenizer.tokenizer.sep_token_id
    short = tokenizer(["small nodule", "no nodule"])
    assert short["input_ids"].shape == (2, n_real) and short["attention_mask"][0].all()
    assert tokenizer("one text")["input_ids"].shape == (1, len(tokenizer.tokenizer.tokenize("one text")) + 2)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_features_do_not_depend_on_the_batch_padding(pooling):
    """A text embeds the same alone (no padding) or beside a longer text (padded)."""
    tower, tokenizer = tiny_tower(pooling).eval(), Tokenizer(None, context_length=64)
    with torch.no_grad():
        alone = tower(**tokenizer(["small nodule"]))
        padded = tower(**tokenizer(["small nodule", "a much longer report sentence " * 4]))[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=1e-5)


def test_pretrained_minilm_weights_are_loaded(minilm, tokenizer):
    """Pretrained sentence embeddings rank a paraphrase far above an unrelated sentence."""
    tokens = tokenizer(["chest CT shows pneumonia", "pneumonia on the chest CT", "the cat sat on the mat"])
    with torch.no_grad():
        hidden = minilm.transformer(**tokens).last_hidden_state
        emb = F.normalize(minilm.pool(hidden, tokens["attention_mask"]), dim=-1)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.8 and sims[0, 2] < 0.3


REPORTS = [
    "There is a small nodule in the right upper lobe. No pleural effusion.\nThe heart is normal.",
    "No acute intracranial abnormality.",
    "",
    "No pleural effusion. The heart is normal. No pleural effusion.",
]


def test_sentence_mean_tokenizer_gives_one_row_per_distinct_sentence():
    """Every sentence of every text keeps its text and points at the one row of its wording."""
    tokens = Tokenizer(None, context_length=24, sentence_mean=True)(REPORTS)
    per_text = [split_sentences(text) or [""] for text in REPORTS]
    sentences = [s for text_sentences in per_text for s in text_sentences]
    distinct = list(dict.fromkeys(sentences))
    assert tokens["text_index"].tolist() == [0, 0, 0, 1, 2, 3, 3, 3]
    assert tokens["input_ids"].shape[0] == len(distinct) == 5
    assert [distinct[row] for row in tokens["sentence_rows"].tolist()] == sentences
    assert tokens["input_ids"].shape[1] == tokens["attention_mask"].sum(1).max() <= 24
    alone = Tokenizer(None, context_length=24)(distinct)
    for row, (ids, mask) in enumerate(zip(tokens["input_ids"], tokens["attention_mask"], strict=True)):
        n = int(mask.sum())
        assert ids[:n].tolist() == alone["input_ids"][row, :n].tolist()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_sentence_mean_averages_unit_sentence_embeddings(pooling):
    """A report's feature is the mean of its sentences' unit features, each embedded on its own."""
    tower = tiny_tower(pooling).eval()
    tokens = Tokenizer(None, context_length=64, sentence_mean=True)(REPORTS)
    with torch.no_grad():
        pooled = tower(**tokens)
        expected = [
            F.normalize(tower(**Tokenizer(None, context_length=64)(split_sentences(t) or [""])), dim=-1).mean(
                0
            )
            for t in REPORTS
        ]
    assert pooled.shape == (len(REPORTS), 8)
    torch.testing.assert_close(pooled, torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_training_encodes_every_sentence_and_evaluation_each_distinct_one():
    """In training each sentence of each text draws its own dropout masks; outside it a shared
    sentence is encoded once."""
    tokens = Tokenizer(None, context_length=32, sentence_mean=True)(REPORTS)
    tower, rows = tiny_tower("mean"), []
    tower.transformer.register_forward_hook(
        lambda module, args, kwargs, out: rows.append(len(kwargs["input_ids"])), with_kwargs=True
    )
    tower.train()(**tokens)
    with torch.no_grad():
        tower.eval()(**tokens)
    assert rows == [len(tokens["sentence_rows"]), len(tokens["input_ids"])] == [8, 5]


def test_sentence_mean_of_one_sentence_points_like_the_sentence():
    """A one-sentence prompt embeds the same way with or without sentence_mean (up to length),
    so prompts and sentence-mean reports share one space."""
    tower = tiny_tower("mean").eval()
    prompt = ["There is a large right pleural effusion."]
    with torch.no_grad():
        plain = tower(**Tokenizer(None, context_length=32)(prompt))
        pooled = tower(**Tokenizer(None, context_length=32, sentence_mean=True)(prompt))
    torch.testing.assert_close(pooled, F.normalize(plain, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("sentence", "without"),
    [
        ("A 12 mm solid nodule in the right upper lobe.", "A solid nodule in the right upper lobe."),
        ("Right upper lobe nodule measuring 1.2 x 0.8 cm.", "Right upper lobe nodule."),
        (
            "Pulmonary nodule, left lower lobe, 7 mm; follow-up CT recommended.",
            "Pulmonary nodule, left lower lobe; follow-up CT recommended.",
        ),
        ("Acute left frontal hematoma measuring 14 mm (about 62 HU).", "Acute left frontal hematoma."),
        (
            "A focus of hyperdense blood in the left frontal lobe, 9 mm.",
            "A focus of hyperdense blood in the left frontal lobe.",
        ),
        ("An 8 mm nodule and a 5-mm nodule.", "A nodule and a nodule."),
        ("A 30 mm abscess.", "An abscess."),
        ("Bullae up to 3 cm, density below -950 HU.", "Bullae, density."),
        ("Effusion of about 200 ml.", "Effusion."),
    ],
)
def test_drop_measurements_cuts_sizes_and_their_words(sentence, without):
    assert drop_measurements(sentence) == without


@pytest.mark.parametrize(
    "text", ["1. No effusion. 2. T2 hyperintense lesion at C5-6.", "No acute intracranial abnormality.", ""]
)
def test_drop_measurements_keeps_text_without_units(text):
    """Numbers without a unit (enumerators, sequences, levels) are not measurements."""
    assert drop_measurements(text) == text


def test_tokenizer_drops_measurements_of_reports_and_prompts_alike():
    report = "There is a 14 mm pulmonary nodule in the right upper lobe (about 40 HU). No effusion."
    for sentence_mean in (False, True):
        cut = Tokenizer(None, context_length=32, sentence_mean=sentence_mean, drop_measurements=True)
        plain = Tokenizer(None, context_length=32, sentence_mean=sentence_mean)
        expected = plain(["There is a pulmonary nodule in the right upper lobe. No effusion."])
        assert all(torch.equal(cut([report])[k], expected[k]) for k in expected)


def test_sentence_mean_trains_every_sentence():
    tower = tiny_tower("mean")
    tokens = Tokenizer(None, context_length=32, sentence_mean=True)(REPORTS[:2])
    tower(**tokens).pow(2).sum().backward()
    assert tower.proj.weight.grad.abs().sum() > 0
    heart = Tokenizer(None).tokenizer.convert_tokens_to_ids("heart")  # only in the third sentence
    assert tower.transformer.embeddings.word_embeddings.weight.grad[heart].abs().sum() > 0


def test_cls_pooling_projects_the_first_hidden_state(tokenizer):
    tower = tiny_tower("cls").eval()
    tokens = tokenizer(["mild emphysema", "normal study"])
    with torch.no_grad():
        hidden = tower.transformer(**tokens).last_hidden_state
        torch.testing.assert_close(tower(**tokens), hidden[:, 0] @ tower.proj.weight.T)
        # Without an explicit mask the tower masks the pad id itself.
        torch.testing.assert_close(tower(tokens["input_ids"]), tower(**tokens))


def test_config_only_tower_has_no_pooler_and_bias_free_projection():
    tower = tiny_tower()
    keys = set(tower.state_dict())
    assert not any(k.startswith("transformer.pooler") for k in keys)
    assert "proj.weight" in keys and "proj.bias" not in keys
    assert tower.proj.weight.shape == (8, 32)


def _trainable(tower: TextTower) -> set[str]:
    return {name for name, p in tower.named_parameters() if p.requires_grad}


def test_lock_freezes_all_but_the_last_layers():
    tower = tiny_tower()
    tower.lock(unlocked_layers=0, freeze_layer_norm=True)
    assert _trainable(tower) == {"proj.weight"}

    tower = tiny_tower()
    tower.lock(unlocked_layers=0, freeze_layer_norm=False)
    assert _trainable(tower) - {"proj.weight"} and all(
        "LayerNorm" in n for n in _trainable(tower) - {"proj.weight"}
    )

    tower = tiny_tower()
    tower.lock(unlocked_layers=1)
    trainable = _trainable(tower)
    assert "proj.weight" in trainable
    assert all(n.startswith(("transformer.encoder.layer.2.", "proj.")) for n in trainable)
    assert any(n.startswith("transformer.encoder.layer.2.") for n in trainable)
    with pytest.raises(ValueError, match="unlocked_layers"):
        tiny_tower().lock(unlocked_layers=4)


def test_grad_checkpointing_gives_the_same_gradients(tokenizer):
    tokens = tokenizer(["right lower lobe consolidation", "unremarkable"])
    grads = []
    for checkpointing in (False, True):
        tower = tiny_tower().train()
        tower.set_grad_checkpointing(checkpointing)
        tower(**tokens).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_missing_model_dir_is_reported_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TextTower.from_pretrained(tmp_path / "BiomedBERT", embed_dim=8)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tokenizer("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext")


def test_remote_code_cxr_bert_directory_loads_as_bert(tmp_path):
    """A CXR-BERT export (model_type cxr-bert, custom classes) loads without trust_remote_code."""
    torch.manual_seed(1)
    masked_lm = BertForMaskedLM(BertConfig(**TINY_BERT))
    masked_lm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="cxr-bert", architectures=["CXRBertModel"], projection_size=128)
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in ("vocab.txt", "special_tokens_map.json"):
        shutil.copy(default_text_model_dir() / name, tmp_path / name)
    tokenizer_config = json.loads((default_text_model_dir() / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "CXRBertTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))

    assert load_text_config(tmp_path).hidden_size == 32
    tower = TextTower.from_pretrained(tmp_path, embed_dim=8)
    expected = {k: v for k, v in masked_lm.bert.state_dict().items() if not k.startswith("pooler")}
    loaded = tower.transformer.state_dict()
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, msg=key)
    assert Tokenizer(tmp_path, context_length=8)(["effusion"])["input_ids"][0, :3].tolist()[0] == 101
