"""Prompt files and labels: parsing, validation messages and label coercion."""

from __future__ import annotations

import numpy as np
import pytest

from hlip.evaluate.labels import (
    LabelError,
    binary_targets,
    check_columns,
    class_targets,
    load_label_table,
    merge_labels,
    to_binary,
)
from hlip.evaluate.prompts import PromptsError, load_prompts, parse_prompts
from hlip.resources import BENCHMARKS, PROMPTS, shipped_names

BASE = {
    "templates": "volume",
    "template_sets": {"volume": ["The volume shows: {}."], "lung": ["The lung shows: {}.", "Lung: {}."]},
    "labels": {
        "Nodule": {"positive": "Nodule", "negative": ["Not nodule", "No nodule"], "templates": "lung"},
        "Effusion": {"positive": ["Effusion"], "column": "effusion"},
    },
    "multiclass": {"Dx": {"column": "dx", "classes": {"Normal": ["Normal"], "Tumour": "Tumour"}}},
}


def test_parse_resolves_templates_columns_and_defaults():
    prompts = parse_prompts(BASE)
    nodule, effusion = prompts.binary
    assert nodule.templates == ("The lung shows: {}.", "Lung: {}.")
    assert nodule.negative == ("Not nodule", "No nodule") and nodule.has_negative
    assert effusion.column == "effusion" and not effusion.has_negative
    assert effusion.templates == ("The volume shows: {}.",)
    assert prompts.multiclass[0].classes == ("Normal", "Tumour")
    assert prompts.columns == ["Nodule", "effusion", "dx"]
    assert (prompts.ensemble, prompts.threshold) == ("embedding", None)  # thresholds come from calibration
    assert parse_prompts({**BASE, "threshold": 0.3}).threshold == 0.3


def test_forced_template_set_overrides_every_label():
    prompts = parse_prompts(BASE, template_set="volume")
    assert {b.templates for b in prompts.binary} == {("The volume shows: {}.",)}
    with pytest.raises(PromptsError, match="no template set 'organ'"):
        parse_prompts(BASE, template_set="organ")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ensemble": "max"}, "ensemble must be one of"),
        ({"threshold": 1.5}, "threshold must lie"),
        ({"version": 2}, "version 2 is not supported"),
        ({"label": {}}, "unknown key 'label' \\(did you mean 'labels'\\?\\)"),
        ({"labels": {"A": {"negative": "x"}}}, "needs `positive`"),
        ({"labels": {"A": {"positive": "x", "templates": "organ"}}}, "names template set 'organ'"),
        ({"labels": {"A": {"positive": "x", "templates": ["no placeholder"]}}}, "placeholder"),
        ({"labels": {"A": {"positive": "x", "postive": "y"}}}, "unknown key 'postive'"),
        ({"labels": {"A": {"positive": []}}}, "non-empty"),
        ({"multiclass": {"T": {"classes": {"only": "x"}}}}, "at least two classes"),
        ({"labels": {}, "multiclass": {}}, "defines no"),
        ({"labels": {"Dx": {"positive": "x"}}}, "defined twice"),
    ],
)
def test_malformed_prompts_get_clear_messages(change, message):
    with pytest.raises(PromptsError, match=message):
        parse_prompts({**BASE, **change}, source="p.toml")


def test_load_prompts_reports_missing_and_broken_files(tmp_path):
    with pytest.raises(PromptsError, match="not found"):
        load_prompts(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("labels = [")
    with pytest.raises(PromptsError, match="not valid TOML"):
        load_prompts(tmp_path / "bad.toml")


SHIPPED = [*shipped_names(PROMPTS), *shipped_names(BENCHMARKS)]


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_shipped_prompt_and_benchmark_files_parse(path):
    prompts = load_prompts(path)
    assert prompts.binary or prompts.multiclass


def test_binary_coercion_and_missing_values():
    values = [1, 0, True, "yes", "No", " positive ", "absent", "", None, float("nan"), "NA", 1.0]
    expected = [1, 0, 1, 1, 0, 1, 0, np.nan, np.nan, np.nan, np.nan, 1]
    np.testing.assert_array_equal([to_binary(v) for v in values], expected)
    with pytest.raises(LabelError, match="'maybe' is not binary"):
        binary_targets([{"a": "maybe"}], "a")


def test_class_targets_match_names_case_insensitively():
    task = parse_prompts(BASE).multiclass[0]
    y = class_targets([{"dx": "normal"}, {"dx": " TUMOUR"}, {}, {"dx": ""}], task)
    assert y.tolist() == [0, 1, -1, -1]
    with pytest.raises(LabelError, match="'stroke', which is none of the classes"):
        class_targets([{"dx": "stroke"}], task)


def test_label_table_overrides_shard_labels(tmp_path):
    (tmp_path / "labels.csv").write_text("key,Nodule,effusion\ns1,1,\ns2,0,1\n")
    table = load_label_table(tmp_path / "labels.csv")
    merged = merge_labels(["s1", "s2", "s3"], [{"Nodule": 0}, {}, {"Nodule": 1}], table)
    assert merged == [{"Nodule": "1", "effusion": ""}, {"Nodule": "0", "effusion": "1"}, {"Nodule": 1}]
    with pytest.raises(LabelError, match="no key column 'study'"):
        load_label_table(tmp_path / "labels.csv", key_column="study")


def test_check_columns_names_unknown_labels_and_suggests():
    prompts = parse_prompts(BASE, source="synth.toml")
    with pytest.raises(LabelError, match=r"(?s)'Nodule'.*did you mean 'nodule'.*'Dx' \(column 'dx'\)"):
        check_columns(prompts, [{"nodule": 1, "effusion": 0}], "shards/")
    with pytest.raises(LabelError, match="carries no labels.*--labels"):
        check_columns(prompts, [{}, {"Nodule": None}], "shards/")
    check_columns(prompts, [{"Nodule": 1, "effusion": 0, "dx": "Normal"}], "shards/")


def test_one_hot_multiclass_columns():
    spec = {
        **BASE,
        "multiclass": {"Dx": {"one_hot": True, "classes": {"Normal": "normal", "Stroke": "stroke"}}},
    }
    task = parse_prompts(spec).multiclass[0]
    assert task.columns == ("Normal", "Stroke")
    y = class_targets([{"Normal": 1, "Stroke": 0}, {"Normal": "0", "Stroke": "1"}, {}], task)
    assert y.tolist() == [0, 1, -1]
    with pytest.raises(LabelError, match="2 of the one-hot class columns"):
        class_targets([{"Normal": 1, "Stroke": 1}], task)
    with pytest.raises(PromptsError, match="either `column` or `one_hot"):
        parse_prompts(
            {**BASE, "multiclass": {"Dx": {"one_hot": True, "column": "dx", "classes": {"a": "a", "b": "b"}}}}
        )


def test_select_restricts_to_named_labels():
    prompts = parse_prompts(BASE)
    subset = prompts.select(["Nodule", "Dx"])
    assert [b.name for b in subset.binary] == ["Nodule"] and [m.name for m in subset.multiclass] == ["Dx"]
    with pytest.raises(PromptsError, match="no label or task named \\['Nodul'\\]"):
        prompts.select(["Nodul"])


def test_synth_prompts_follow_the_planted_findings():
    from hlip.synth import FINDINGS

    prompts = load_prompts("synth")
    assert [b.name for b in prompts.binary] == [n for n, f in FINDINGS.items() if f.kind in ("CT", "MR")]
    for label in prompts.binary:
        finding = FINDINGS[label.name]
        assert (label.positive, label.negative) == (finding.positive_prompts, finding.negative_prompts)
        assert label.templates == ("{}",)  # plain phrases, alone
        # plain: no size and no report context
        assert not any(c.isdigit() for phrase in (*label.positive, *label.negative) for c in phrase)


def test_benchmark_label_sets():
    benchmarks = {name: load_prompts(name) for name in shipped_names(BENCHMARKS)}
    assert len(benchmarks["ct-rate"].binary) == 18
    assert set(benchmarks["ct-rate"].benchmark["hlip_published_subset"]) < {
        b.name for b in benchmarks["ct-rate"].binary
    }
    assert [b.column for b in benchmarks["rsna-ich"].binary] == [
        "Any", "Epidural", "Intraparenchymal", "Intraventricular", "Subarachnoid", "Subdural"
    ]  # fmt: skip
    assert not any(b.has_negative for b in (*benchmarks["rsna-ich"].binary, *benchmarks["cq500"].binary))
    (brain,) = benchmarks["pub-brain-5"].multiclass
    assert brain.one_hot and brain.classes == ("Normal", "Stroke", "Glioma", "Meningioma", "Metastasis")
