"""De-identification: pseudonymous study keys, an allow-list of header fields, report scrubbing.

What this module guarantees, and what it does not, is documented in ``docs/ingest.md``
("De-identification"). In short:

* a study's key is an HMAC-SHA256 of its StudyInstanceUID under a secret, so keys are
  stable across runs that share the secret and cannot be linked back to the UID without it;
* only allow-listed header fields reach a sample (:func:`allowed_meta`); everything else,
  names, IDs, dates, UIDs, free-text descriptions, is dropped;
* report text is scrubbed of the PHI values *found in the study's own headers*
  (:func:`scrub_report`). PHI that the headers do not carry (another person's name, a
  phone number, a date of a prior exam) is not found by this: it is not a full free-text
  de-identification.
"""

from __future__ import annotations

import calendar
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

SECRET_ENV = "HLIP_DEID_SECRET"
SECRET_FILE = Path("_ingest") / "secret"
STUDY_KEY_HEX_DIGITS = 20
"""80 bits: the chance of any collision among 10^7 studies is below 10^-9."""

_KEY_DOMAIN = b"hlip-study-key-v1\x00"

NAME, ID, DATE, INSTITUTION, OTHER = "[NAME]", "[ID]", "[DATE]", "[INSTITUTION]", "[REDACTED]"

PHI_KEYWORDS: dict[str, str] = {
    "PatientName": NAME,
    "OtherPatientNames": NAME,
    "PatientBirthName": NAME,
    "PatientMotherBirthName": NAME,
    "ReferringPhysicianName": NAME,
    "PerformingPhysicianName": NAME,
    "NameOfPhysiciansReadingStudy": NAME,
    "PhysiciansOfRecord": NAME,
    "RequestingPhysician": NAME,
    "OperatorsName": NAME,
    "PatientID": ID,
    "OtherPatientIDs": ID,
    "AccessionNumber": ID,
    "StudyID": ID,
    "PatientBirthDate": DATE,
    "StudyDate": DATE,
    "SeriesDate": DATE,
    "AcquisitionDate": DATE,
    "ContentDate": DATE,
    "InstitutionName": INSTITUTION,
    "InstitutionAddress": INSTITUTION,
    "InstitutionalDepartmentName": INSTITUTION,
}
"""Header fields whose values are searched for in report text, with their placeholder."""

ALLOWED_FIELDS = (
    "Modality",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "PatientSex",
)
"""Header fields copied into a sample's metadata (see :func:`allowed_meta`)."""

NUMERIC_FIELDS = frozenset({"MagneticFieldStrength", "SliceThickness", "KVP"})

AGE_BIN_YEARS = 5
AGE_TOP_CODE = 90
"""Ages of 90 and over collapse into one group, as HIPAA Safe Harbor requires."""


# --- secret and study key --------------------------------------------------------------


def resolve_secret(option: str | bytes | None, out_dir: str | os.PathLike) -> bytes:
    """The key of the study-key HMAC: ``option``, else ``$HLIP_DEID_SECRET``, else a random
    secret persisted in ``out_dir/_ingest/secret``.

    The persisted secret is created once (mode 0600, 256 random bits as hex text) and
    reused by later runs into the same directory, so re-runs give the same keys. Its text
    is the secret itself: putting that text into ``HLIP_DEID_SECRET`` elsewhere gives the
    same keys there.
    """
    if option is not None:
        return _non_empty(option.encode() if isinstance(option, str) else bytes(option), "the secret option")
    from_env = os.environ.get(SECRET_ENV)
    if from_env is not None:
        return _non_empty(from_env.encode(), SECRET_ENV)
    return _persisted_secret(Path(out_dir) / SECRET_FILE)


def _non_empty(secret: bytes, origin: str) -> bytes:
    if not secret.strip():
        raise ValueError(f"{origin} is empty; a de-identification secret must not be empty")
    return secret


def _persisted_secret(path: Path) -> bytes:
    """Read the secret at ``path`` or create it atomically (two racing runs agree on one)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)  # fails if another run created it first: then theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return _non_empty(path.read_text().strip().encode(), str(path))


def study_key(study_uid: str, secret: bytes) -> str:
    """Pseudonymous study key: the first 20 hex digits of HMAC-SHA256(secret, StudyInstanceUID).

    Only ``[0-9a-f]``, so it is a safe WebDataset key (no dots, no separators).
    """
    if not secret:
        raise ValueError("study_key needs a non-empty secret")
    digest = hmac.new(secret, _KEY_DOMAIN + str(study_uid).strip().encode(), hashlib.sha256).hexdigest()
    return digest[:STUDY_KEY_HEX_DIGITS]


# --- allow-listed metadata -------------------------------------------------------------


def allowed_meta(header: Mapping[str, Any]) -> dict[str, Any]:
    """The header fields a sample may carry; everything not listed here is dropped.

    Passed through (when present and not empty): :data:`ALLOWED_FIELDS`, numbers as
    floats, ``PatientSex`` only as M, F or O. Derived: ``ContrastBolusAgentPresent``
    (whether ContrastBolusAgent is filled in; the agent's free text is dropped) and
    ``PatientAgeGroup`` (5-year groups such as ``"45-49"``, ``"90+"`` from 90 on) from
    PatientAge, or from PatientBirthDate and StudyDate when PatientAge is absent.
    """
    meta: dict[str, Any] = {}
    for keyword in ALLOWED_FIELDS:
        value = _plain(header.get(keyword))
        if keyword in NUMERIC_FIELDS:
            value = _number(value)
        if value not in (None, "", []):
            meta[keyword] = value
    if meta.get("PatientSex") not in (None, "M", "F", "O"):
        del meta["PatientSex"]
    if "ContrastBolusAgent" in header:
        meta["ContrastBolusAgentPresent"] = bool(str(_plain(header["ContrastBolusAgent"]) or "").strip())
    age = _age_years(header)
    if age is not None:
        meta["PatientAgeGroup"] = age_group(age)
    return meta


def _number(value: Any) -> float | None:
    """A numeric field as a float; a multi-valued one by its first value; junk as None."""
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None


def _plain(value: Any) -> Any:
    """Header values as JSON-able plain types: numbers as float, multi-values as lists."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, Sequence):
        return [item for item in (_plain(v) for v in value) if item not in (None, "")]
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value).strip()


def age_group(years: float) -> str:
    """``"0-4"``, ``"5-9"``, ..., ``"85-89"``, ``"90+"``."""
    if years >= AGE_TOP_CODE:
        return f"{AGE_TOP_CODE}+"
    low = int(max(years, 0) // AGE_BIN_YEARS) * AGE_BIN_YEARS
    return f"{low}-{low + AGE_BIN_YEARS - 1}"


_AGE_UNITS = {"Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def _age_years(header: Mapping[str, Any]) -> float | None:
    """PatientAge (an AS value such as ``045Y``) in years, else birth date to study date."""
    age = str(header.get("PatientAge") or "").strip().upper()
    match = re.fullmatch(r"(\d{1,3})\s*([YMWD])?", age)
    if match:
        return int(match.group(1)) * _AGE_UNITS[match.group(2) or "Y"]
    birth, study = _parse_da(header.get("PatientBirthDate")), _parse_da(header.get("StudyDate"))
    if birth and study and study >= birth:
        return (study - birth).days / 365.25
    return None


def _parse_da(value: Any) -> dt.date | None:
    """A DICOM DA value (YYYYMMDD), or None."""
    text = re.sub(r"[^0-9]", "", str(value or ""))
    try:
        return dt.datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


# --- report scrubbing ------------------------------------------------------------------


def phi_values(headers: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """The PHI values (:data:`PHI_KEYWORDS`) found in a study's headers, by keyword."""
    found: dict[str, list[str]] = {}
    for header in headers:
        for keyword in PHI_KEYWORDS:
            for value in _values(header.get(keyword)):
                if value not in found.setdefault(keyword, []):
                    found[keyword].append(value)
    return {keyword: values for keyword, values in found.items() if values}


def _values(value: Any) -> list[str]:
    """Header value(s) as strings; multi-valued elements give one string per value."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or (isinstance(value, Sequence) and not isinstance(value, str)):
        return [text for v in value for text in _values(v)]
    text = str(value).strip()
    return [text] if text else []


def scrub_report(text: str, phi_values: Mapping[str, Any]) -> str:
    """Replace the study's header PHI values in ``text`` by placeholders.

    ``phi_values`` maps a DICOM keyword to one value or a list of values (as from
    :func:`phi_values`). The category of a keyword (:data:`PHI_KEYWORDS`, else a guess
    from its name) decides how its values are searched for:

    * names (``DOE^JOHN^Q``): "John Doe", "John Q. Doe", "Doe, John", "DOE JOHN", "J. Doe",
      "Doe J", the raw value, and each name part of 2+ letters alone when written
      capitalised or in capitals ("Dr. Doe", "DOE"), all -> ``[NAME]``;
    * IDs and accession numbers (3+ letters or digits), in any case and with any of
      ``- _ / .`` or spaces between characters, and without leading zeros -> ``[ID]``;
    * dates (YYYYMMDD): 20240303, 2024-03-03, 03/03/2024, 3.3.24, March 3, 2024,
      3rd of Mar. 2024, ... (month-first and day-first) -> ``[DATE]``;
    * institutions: the words in order, any case and spacing -> ``[INSTITUTION]``;
    * anything else: the literal value, any case -> ``[REDACTED]``.
    """
    rules: dict[str, list[str]] = {}
    for keyword, value in phi_values.items():
        category = _category(keyword)
        for item in _values(value):
            rules.setdefault(category, []).extend(_PATTERNS[category](item))
    for category in (INSTITUTION, NAME, DATE, ID, OTHER):
        text = _substitute(text, rules.get(category, []), category)
    return text


def _category(keyword: str) -> str:
    if keyword in PHI_KEYWORDS:
        return PHI_KEYWORDS[keyword]
    for marker, category in (
        ("Name", NAME),
        ("Date", DATE),
        ("ID", ID),
        ("Number", ID),
        ("Institution", INSTITUTION),
    ):
        if marker in keyword:
            return category
    return OTHER


def _substitute(text: str, patterns: list[str], placeholder: str) -> str:
    """Replace every match of ``patterns`` (tried longest first) by ``placeholder``.

    Matches never start or end inside a word or inside an earlier placeholder.
    """
    if not patterns:
        return text
    ordered = sorted(set(patterns), key=len, reverse=True)
    combined = "|".join(f"(?:{p})" for p in ordered)
    return re.sub(rf"(?<![\w\[])(?:{combined})(?![\w\]])", placeholder, text)


def _words(text: str) -> str:
    """``text`` as a regex matching its words with any whitespace between them."""
    return r"\s+".join(re.escape(word) for word in text.split())


def _ci(pattern: str) -> str:
    return f"(?i:{pattern})"


def _name_patterns(value: str) -> list[str]:
    family, given, middle = _name_parts(value)
    patterns = [_ci(re.escape(value))] if "^" in value else []
    parts = [p for p in (family, given, middle) if p]
    if family and given:
        f, g = _words(family), _words(given)
        i = re.escape(given[0])
        m = rf"(?:\s+(?:{_words(middle)}|{re.escape(middle[0])}\.?))?" if middle else ""
        patterns += [
            _ci(rf"{g}{m}\s+{f}"),
            _ci(rf"{f}\s*,\s*{g}{m}"),
            _ci(rf"{f}\s+{g}{m}"),
            _ci(rf"{i}\.?{m}\s+{f}"),
            _ci(rf"{f}(?:\s*,\s*|\s+){i}\.?"),
        ]
    for part in parts:
        if len(part) >= 2:
            patterns += sorted({_words(part), _words(part.upper()), _words(_title(part))})
    return patterns


def _title(text: str) -> str:
    """Capitalise each word, also after hyphens and apostrophes (O'Brien, Smith-Jones)."""
    return re.sub(r"[^\W\d_]+", lambda m: m.group(0).capitalize(), text.lower())


def _name_parts(value: str) -> tuple[str, str, str]:
    """(family, given, middle) of a PN value ``Family^Given^Middle^Prefix^Suffix``, or of a
    free-text name ``Family, Given Middle`` or ``Given Middle Family``."""
    value = value.split("=")[0].strip()
    if "^" in value:
        parts = [p.strip() for p in value.split("^")] + ["", ""]
        return parts[0], parts[1], parts[2]
    if "," in value:
        family, _, rest = value.partition(",")
        words = rest.split()
        return family.strip(), words[0] if words else "", " ".join(words[1:])
    words = value.split()
    if len(words) == 1:
        return words[0], "", ""
    return words[-1], words[0], " ".join(words[1:-1])


def _id_patterns(value: str) -> list[str]:
    chars = re.sub(r"[^0-9A-Za-z]", "", value)
    patterns = [_ci(re.escape(value))] if len(value) >= 3 else []
    variants = {chars, chars.lstrip("0")} if len(chars.lstrip("0")) >= 3 else {chars}
    for variant in variants:
        if len(variant) >= 3:
            patterns.append(_ci(r"[-_/.\s]?".join(re.escape(c) for c in variant)))
    return patterns


_MONTHS = {m: (calendar.month_name[m], calendar.month_abbr[m]) for m in range(1, 13)}


def _date_patterns(value: str) -> list[str]:
    date = _parse_da(value)
    if date is None:
        return [_ci(re.escape(value))] if value else []
    y, yy = f"{date.year:04d}", f"{date.year % 100:02d}"
    m, d = rf"0?{date.month}", rf"0?{date.day}"
    numeric = [rf"{y}{date.month:02d}{date.day:02d}"]
    for sep in map(re.escape, "-/. "):
        numeric += [
            rf"{y}{sep}{m}{sep}{d}",
            rf"{m}{sep}{d}{sep}(?:{y}|{yy})",
            rf"{d}{sep}{m}{sep}(?:{y}|{yy})",
        ]
    full, abbr = _MONTHS[date.month]
    month = rf"(?:{full}|{abbr}{'|Sept' if date.month == 9 else ''})\.?"
    day = rf"{d}(?:st|nd|rd|th)?"
    textual = [
        rf"{month}\s+{day},?\s+(?:{y}|'?{yy})",
        rf"{day}\s+(?:of\s+)?{month},?\s+(?:{y}|'?{yy})",
    ]
    return [_ci(p) for p in numeric + textual] + [_ci(re.escape(value))]


def _institution_patterns(value: str) -> list[str]:
    return [_ci(_words(value))] if value.strip() else []


def _literal_patterns(value: str) -> list[str]:
    return [_ci(re.escape(value))] if value else []


_PATTERNS = {
    NAME: _name_patterns,
    ID: _id_patterns,
    DATE: _date_patterns,
    INSTITUTION: _institution_patterns,
    OTHER: _literal_patterns,
}
