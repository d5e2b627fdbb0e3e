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
    assert default[ROWS[0][key_column]].labels == {
        "lung_nodule": 1,
        "pleural_effusion": 0,
    }  # 0/1 findings only
    assert other_key not in default[ROWS[0][key_column]].labels


HOSPITAL_EXPORT = [
    {
        "AccessionNumber": f"00{7310 + i}",
        "MRN": f"00{1010 + i}",
        "patient_name": ["DOE^JANE", "ROE^RICHARD", "POE^EDGAR"][i % 3],
        "DOB": f"19{50 + i}-04-12",
        "exam_date": f"2024-03-{10 + i}",
        "StudyDate": f"202403{10 + i}",
        "referring_physician": "Dr. Alice Smith",
        "phone": f"555-867-53{10 + i}",
        "home_address": f"{i + 12} Elm Street, Springfield",
        "report": "Lungs clear. No pleural effusion or pneumothorax."
        if i % 2
        else "Small right apical pneumothorax, 8 mm. No effusion.",
        "pneumothorax": 1 - i % 2,
        "nodule": 0,
        "contrast": ["yes", "no"][i % 2],
        "priority": "routine",
        "age": 40 + i,
    }
    for i in range(24)
]


def test_default_labels_are_the_binary_findings_and_the_rest_is_named_in_a_warning(tmp_path, caplog):
    path = write_table(tmp_path / "export.csv", HOSPITAL_EXPORT)
    with caplog.at_level("WARNING", logger="hlip.ingest.reports"):
        table = load_report_table(path, "AccessionNumber")
    assert list(table)[:2] == ["007310", "007311"]  # the key keeps its leading zeros
    assert {tuple(report.labels) for report in table.values()} == {("pneumothorax", "nodule")}
    assert table["007310"].labels == {"pneumothorax": 1, "nodule": 0}
    for column in ("MRN", "patient_name", "DOB", "exam_date", "contrast", "age"):
        assert column in caplog.text


@pytest.mark.parametrize(
    ("column", "reason"),
    [
        ("MRN", "identifying name"),
        ("patient_name", "identifying name"),
        ("DOB", "identifying name"),
        ("exam_date", "identifying name"),
        ("StudyDate", "identifying name"),
        ("referring_physician", "identifying name"),
        ("phone", "identifying name"),
        ("home_address", "identifying name"),
        ("report", "free text"),
    ],
)
def test_identifying_and_free_text_columns_are_refused_even_when_asked(tmp_path, column, reason):
    path = write_table(tmp_path / "export.csv", HOSPITAL_EXPORT)
    with pytest.raises(ReportTableError, match=f"refusing label column.*'{column}' \\({reason}"):
        load_report_table(
            path, "AccessionNumber", text_columns=("priority",), label_columns=["nodule", column]
        )


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (["2024-03-01", "2024-03-02"], "date or time"),  # CSV reads these as dates
        (["01/03/2024", "02/03/2024"], "a date"),
        ([20240301, 20240302], "a date"),
        (["DOE^JANE", "ROE^RICH"], "DICOM person name"),
        (["+1 555 867 5309", "x"], "phone number"),
        (["jane@example.org", "x"], "e-mail"),
        (["A0012345", "x"], "long number"),
        ([f"C{i}" for i in range(24)], "every value differs"),
        ([1000 + i for i in range(24)], "every value differs"),
    ],
)
def test_values_that_identify_are_refused_under_a_harmless_name(tmp_path, values, reason):
    rows = [{"StudyInstanceUID": f"1.2.{i}", "report": "", "grade": value} for i, value in enumerate(values)]
    path = write_table(tmp_path / "t.csv", rows)
    with pytest.raises(ReportTableError, match=f"'grade' \\(.*{reason}"):
        load_report_table(path, label_columns=["grade"])


def test_label_prefix_and_named_columns_allow_categorical_labels(tmp_path):
    rows = [{**row, "label_stage": "T1", "label_size_mm": 12.5} for row in HOSPITAL_EXPORT]
    path = write_table(tmp_path / "export.csv", rows)
    table = load_report_table(
        path, "AccessionNumber", label_columns=["contrast", "age"], label_prefixes=["label_"]
    )
    assert table["007311"].labels == {"contrast": "no", "age": 41, "label_stage": "T1", "label_size_mm": 12.5}
    with pytest.raises(ReportTableError, match="'MRN'"):
        load_report_table(path, "AccessionNumber", label_prefixes=["label_", "M"])


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
