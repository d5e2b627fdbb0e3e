"""Report tables (CSV, Parquet, JSONL; keyed by StudyInstanceUID or AccessionNumber), text
cleaning and DICOM SR text extraction."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.data import get_testdata_file

from hlip.ingest.reports import ReportTableError, clean_text, load_report_table, section_heading, sr_text

ROWS = [
    {
        "StudyInstanceUID": "1.2.3.1",
        "AccessionNumber": "000123",
        "Findings_EN": 'No pleural effusion.\nA 12 mm nodule,\n"right upper lobe".',
        "Impressions_EN": "Nodule.",
        "lung_nodule": 1,
        "pleural_effusion": 0,
        "score": 0.25,
        "site": "north",
    },
    {
        "StudyInstanceUID": "1.2.3.2",
        "AccessionNumber": "000124",
        "Findings_EN": "Normal.",
        "Impressions_EN": None,
        "lung_nodule": 0,
        "pleural_effusion": None,
        "score": None,
        "site": None,
    },
]


def write_table(path, rows):
    table = pa.Table.from_pylist(rows)
    if path.suffix == ".parquet":
        pq.write_table(table, path)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pa_csv.write_csv(table, path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
@pytest.mark.parametrize("key_column", ["StudyInstanceUID", "AccessionNumber"])
def test_load_report_table_formats_and_keys(tmp_path, suffix, key_column):
    path = write_table(tmp_path / f"reports{suffix}", ROWS)
    other_key = "AccessionNumber" if key_column == "StudyInstanceUID" else "StudyInstanceUID"
    table = load_report_table(
        path,
        key_column=key_column,
        text_columns=("Findings_EN", "Impressions_EN"),
        label_columns=["lung_nodule", "pleural_effusion", "score", "site"],
    )
    first, second = (table[row[key_column]] for row in ROWS)
    assert list(table) == [row[key_column] for row in ROWS]  # leading zeros kept
    assert (
        first.text
        == 'Findings:\nNo pleural effusion.\nA 12 mm nodule,\n"right upper lobe".\n\nImpressions:\nNodule.'
    )
    assert second.text == "Findings:\nNormal."
    assert first.labels == {"lung_nodule": 1, "pleural_effusion": 0, "score": 0.25, "site": "north"}
    assert second.labels == {"lung_nodule": 0}
    assert isinstance(first.labels["lung_nodule"], int)
    default = load_report_table(path, key_column, text_columns=("Findings_EN", "Impressions_EN"))
    assert default[ROWS[0][key_column]].labels == first.labels  # identifiers never become labels
    assert other_key not in default[ROWS[0][key_column]].labels


def test_single_text_column_has_no_heading_and_mapping_sets_headings(tmp_path):
    path = write_table(tmp_path / "r.csv", ROWS)
    plain = load_report_table(path, text_columns=("Impressions_EN",), label_columns=[])
    assert plain["1.2.3.1"] == plain["1.2.3.1"].__class__("Nodule.", {})
    assert plain["1.2.3.2"].text == ""
    named = load_report_table(path, text_columns={"Impressions_EN": "Impression"}, label_columns=[])
    assert named["1.2.3.1"].text == "Impression:\nNodule."


def test_missing_columns_are_named(tmp_path):
    path = write_table(tmp_path / "r.csv", ROWS)
    with pytest.raises(ReportTableError, match=r"missing column\(s\) \['report'\]"):
        load_report_table(path)
    with pytest.raises(ReportTableError, match="PatientID"):
        load_report_table(path, text_columns=("Findings_EN",), label_columns=["PatientID"])


def test_duplicate_and_empty_keys_are_reported(tmp_path):
    path = write_table(tmp_path / "dup.csv", [ROWS[0], ROWS[1], {**ROWS[1], "Findings_EN": "again"}])
    with pytest.raises(ReportTableError, match=r"duplicate StudyInstanceUID value\(s\) '1\.2\.3\.2'"):
        load_report_table(path, text_columns=("Findings_EN",))
    path = write_table(tmp_path / "empty.csv", [ROWS[0], {**ROWS[1], "StudyInstanceUID": None}])
    with pytest.raises(ReportTableError, match=r"empty StudyInstanceUID in data row\(s\) 1"):
        load_report_table(path, text_columns=("Findings_EN",))


def test_unknown_table_type(tmp_path):
    with pytest.raises(ReportTableError, match="unknown table type"):
        load_report_table(tmp_path / "r.xlsx")


def test_section_heading():
    assert section_heading("Findings_EN") == "Findings"
    assert section_heading("clinical_information") == "Clinical information"


def test_clean_text():
    raw = "\ufeffCafe\u0301  x\t y \r\nline\x00two\u200b\r\n\r\n\r\n\n  end  "
    assert clean_text(raw) == "Caf\u00e9 x y\nline two\n\nend"


def sr_item(value_type, name, relationship="CONTAINS", **values):
    item = pydicom.Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "1", "99TEST", name
    item.ConceptNameCodeSequence = [code]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def test_sr_text_walks_containers_and_skips_context():
    observer = sr_item("PNAME", "Person Observer Name", "HAS OBS CONTEXT", PersonName="DOE^JANE")
    finding = sr_item("TEXT", "Finding", TextValue="A 12 mm nodule.")
    findings = sr_item("CONTAINER", "Findings", ContinuityOfContent="SEPARATE", ContentSequence=[finding])
    impression = sr_item("TEXT", "Impression", TextValue="Nodule.")
    impressions = sr_item(
        "CONTAINER", "Impressions", ContinuityOfContent="SEPARATE", ContentSequence=[impression]
    )
    root = pydicom.Dataset()
    root.ValueType, root.ContinuityOfContent = "CONTAINER", "SEPARATE"
    root.ContentSequence = [observer, findings, impressions]
    assert sr_text(root) == "Findings:\nA 12 mm nodule.\n\nImpressions:\nNodule."


def test_sr_text_on_pydicom_test_files():
    comprehensive = pydicom.dcmread(get_testdata_file("test-SR.dcm"))
    text = sr_text(comprehensive)
    assert text.startswith("A mass of 3 cm was detected.")
    assert "Inferred Sample Text" in text
    assert "Some UID" not in text  # observation context is left out
    basic = pydicom.dcmread(get_testdata_file("reportsi.dcm"))
    assert sr_text(basic) == "Section Heading:\nEnter text"
