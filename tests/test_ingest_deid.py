"""De-identification: study keys, the secret's origin and persistence, allow-listed metadata,
and report scrubbing of header PHI in every listed format."""

from __future__ import annotations

import datetime as dt
import re
import stat

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hlip.ingest import deid

SECRET = b"test-secret"


def test_study_key_is_stable_short_and_safe():
    uid = "1.2.826.0.1.3680043.8.498.12345"
    key = deid.study_key(uid, SECRET)
    assert key == deid.study_key(uid, SECRET) == deid.study_key(f" {uid} ", SECRET)
    assert re.fullmatch(r"[0-9a-f]{20}", key)
    assert uid not in key


def test_study_key_depends_on_secret_and_uid():
    uid = "1.2.3.4"
    assert deid.study_key(uid, SECRET) != deid.study_key(uid, b"other-secret")
    keys = {deid.study_key(f"1.2.3.{i}", SECRET) for i in range(2000)}
    assert len(keys) == 2000
    with pytest.raises(ValueError):
        deid.study_key(uid, b"")


def test_secret_option_wins_over_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(deid.SECRET_ENV, "from-env")
    assert deid.resolve_secret("from-option", tmp_path) == b"from-option"
    assert deid.resolve_secret(b"raw", tmp_path) == b"raw"
    assert deid.resolve_secret(None, tmp_path) == b"from-env"
    assert not (tmp_path / deid.SECRET_FILE).exists()
    with pytest.raises(ValueError, match="empty"):
        deid.resolve_secret("", tmp_path)


def test_secret_is_persisted_private_and_reused(monkeypatch, tmp_path):
    monkeypatch.delenv(deid.SECRET_ENV, raising=False)
    first = deid.resolve_secret(None, tmp_path)
    path = tmp_path / deid.SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 64
    assert deid.resolve_secret(None, tmp_path) == first
    assert deid.resolve_secret(None, tmp_path / "elsewhere") != first
    # the persisted text is the secret itself: exporting it reproduces the keys elsewhere
    monkeypatch.setenv(deid.SECRET_ENV, path.read_text().strip())
    assert deid.study_key("1.2.3", deid.resolve_secret(None, tmp_path / "x")) == deid.study_key(
        "1.2.3", first
    )
    assert [p.name for p in path.parent.iterdir()] == ["secret"]


def test_allowed_meta_keeps_only_the_allow_list():
    header = {
        "Modality": "CT",
        "BodyPartExamined": "CHEST",
        "Manufacturer": "SIEMENS",
        "SliceThickness": "2.5",
        "KVP": 120,
        "ConvolutionKernel": ["Br40d", "3"],
        "PatientSex": "F",
        "PatientAge": "067Y",
        "ContrastBolusAgent": "Omnipaque 350",
        "PatientName": "DOE^JANE",
        "PatientID": "123456",
        "StudyInstanceUID": "1.2.3",
        "InstitutionName": "Somewhere",
        "StudyDescription": "CT CHEST for Jane Doe",
        "StationName": "CT01",
    }
    assert deid.allowed_meta(header) == {
        "Modality": "CT",
        "BodyPartExamined": "CHEST",
        "Manufacturer": "SIEMENS",
        "SliceThickness": 2.5,
        "KVP": 120.0,
        "ConvolutionKernel": ["Br40d", "3"],
        "PatientSex": "F",
        "ContrastBolusAgentPresent": True,
        "PatientAgeGroup": "65-69",
    }


@pytest.mark.parametrize(
    ("header", "group"),
    [
        ({"PatientAge": "004Y"}, "0-4"),
        ({"PatientAge": "018M"}, "0-4"),
        ({"PatientAge": "089Y"}, "85-89"),
        ({"PatientAge": "090Y"}, "90+"),
        ({"PatientAge": "103Y"}, "90+"),
        ({"PatientBirthDate": "19800615", "StudyDate": "20240614"}, "40-44"),
        ({"PatientBirthDate": "19800615", "StudyDate": "20250616"}, "45-49"),
    ],
)
def test_age_groups(header, group):
    assert deid.allowed_meta(header)["PatientAgeGroup"] == group


def test_allowed_meta_drops_odd_values():
    meta = deid.allowed_meta({"PatientSex": "Jane", "ContrastBolusAgent": "", "SliceThickness": "thin"})
    assert meta == {"ContrastBolusAgentPresent": False}


def test_phi_values_gathers_every_header():
    headers = [
        {"PatientName": "DOE^JANE", "AccessionNumber": "A1", "Modality": "CT"},
        {"PatientName": "DOE^JANE", "OtherPatientIDs": ["X1", "X2"], "StudyDate": None},
    ]
    assert deid.phi_values(headers) == {
        "PatientName": ["DOE^JANE"],
        "AccessionNumber": ["A1"],
        "OtherPatientIDs": ["X1", "X2"],
    }


def test_scrub_report_example():
    phi = {
        "PatientName": "DOE^JOHN^Q",
        "ReferringPhysicianName": "O'BRIEN^MARY",
        "PatientID": "00451234",
        "AccessionNumber": "A-2024-0099",
        "StudyDate": "20240303",
        "InstitutionName": "Riverbend General Hospital",
    }
    text = (
        "Patient: DOE, JOHN Q (MRN 451234). Exam of March 3rd, 2024 at riverbend  general hospital, "
        "referred by Dr. Mary O'Brien. Accession A20240099.\nFindings: No pleural effusion."
    )
    assert deid.scrub_report(text, phi) == (
        "Patient: [NAME] (MRN [ID]). Exam of [DATE] at [INSTITUTION], "
        "referred by Dr. [NAME]. Accession [ID].\nFindings: No pleural effusion."
    )


def test_scrub_keeps_words_that_merely_contain_phi():
    phi = {"PatientName": "HALL^ANN", "PatientID": "1234"}
    text = "Small hallmark finding in the annulus; 12345 and 1234 differ."
    assert deid.scrub_report(text, phi) == "Small hallmark finding in the annulus; 12345 and [ID] differ."


_letters = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=2, max_size=10)
_ids = st.text(alphabet="ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=4, max_size=12)
_dates = st.dates(min_value=dt.date(1900, 1, 1), max_value=dt.date(2099, 12, 31))
FILLER = "Findings: no pleural effusion. Impression: stable nodule."


def name_formats(family: str, given: str) -> list[str]:
    f, g = family.capitalize(), given.capitalize()
    return [
        f"{g} {f}",
        f"{f}, {g}",
        f"{f.upper()}^{g.upper()}",
        f"{f.upper()} {g.upper()}",
        f"{f.upper()}, {g.upper()}",
        f"Dr. {f}",
        f"{g[0]}. {f}",
    ]


def date_formats(date: dt.date) -> list[str]:
    month = date.strftime("%B")
    return [
        date.strftime("%Y%m%d"),
        date.strftime("%Y-%m-%d"),
        date.strftime("%m/%d/%Y"),
        f"{date.month}/{date.day}/{date.year}",
        date.strftime("%d.%m.%Y"),
        f"{month} {date.day}, {date.year}",
        f"{date.day} {month} {date.year}",
        f"{date.strftime('%b')}. {date.day}, {date.year}",
    ]


def id_formats(value: str) -> list[str]:
    return [value, value.lower(), "-".join(value[i : i + 3] for i in range(0, len(value), 3))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=_letters, given_name=_letters, birth=_dates, study=_dates, patient_id=_ids, accession=_ids)
def test_scrubbed_phi_never_survives(family, given_name, birth, study, patient_id, accession):
    phi = {
        "PatientName": f"{family.upper()}^{given_name.upper()}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "StudyDate": study.strftime("%Y%m%d"),
        "PatientID": patient_id,
        "AccessionNumber": accession,
    }
    formats = (
        name_formats(family, given_name)
        + date_formats(birth)
        + date_formats(study)
        + id_formats(patient_id)
        + id_formats(accession)
    )
    text = FILLER + " " + " ; ".join(f"({fmt})" for fmt in formats) + " " + FILLER
    scrubbed = deid.scrub_report(text, phi).lower()
    for fmt in formats:
        assert fmt.lower() not in scrubbed, fmt
    words = set(re.findall(r"[a-z]+", FILLER.lower()))
    assume(not ({family, given_name, patient_id.lower(), accession.lower()} & words))
    assert scrubbed.startswith(FILLER.lower())
