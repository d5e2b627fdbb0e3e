"""Writing a synthetic archive: every study's files loose in one of three folder layouts, as a
zip export or as a DICOMDIR file set, the clutter of a real export, and ``reports.csv``; with a
record of every file written and every PHI string, for tests to check an ingest run against."""

from __future__ import annotations

import csv
import io
import tempfile
import zipfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import UID, ExplicitVRLittleEndian

from hlip.ingest.reports import sr_text
from hlip.synth.encoding import TRANSFER_SYNTAX_CYCLE, available_transfer_syntaxes, series_files
from hlip.synth.findings import FINDINGS
from hlip.synth.reports import phi_strings, phi_variants, report_sections, report_text
from hlip.synth.series import Series, ct_series, mr_series, sr_report
from hlip.synth.studies import Sizes, Study, plan_study

KINDS = {
    "ct_axial_thin": "thin axial CT (ORIGINAL\\PRIMARY\\AXIAL)",
    "ct_axial_thick": "thick axial CT",
    "ct_axial_tilted": "thick axial CT with gantry tilt (sheared stack)",
    "ct_reformat": "coronal or sagittal reformat (DERIVED\\SECONDARY\\REFORMATTED)",
    "mr_t1": "T1-weighted MR (sagittal)",
    "mr_t2": "T2-weighted MR (axial, oblique in some studies)",
    "mr_flair": "FLAIR MR (axial, oblique in some studies)",
    "localizer": "localizer: CT topograms, MR 3-plane (one series)",
    "dose_report": "dose screen secondary capture with burned-in text",
    "sr_report": "Basic Text or Enhanced SR carrying the study's report",
    "duplicate": "byte-identical copy of another instance",
    "truncated": "DICOM file cut short inside the pixel data",
    "empty": "zero-byte file",
    "not_dicom": "text or binary junk",
    "dicomdir": "DICOMDIR of a file-set export",
}
"""Every kind of file :func:`make_archive` writes."""

SCAN_KINDS = frozenset(
    {"ct_axial_thin", "ct_axial_thick", "ct_axial_tilted", "ct_reformat", "mr_t1", "mr_t2", "mr_flair"}
)


@dataclass
class SynthFile:
    """One file of the archive; ``member`` names it inside the zip at ``path`` ("" if none)."""

    path: str
    kind: str
    member: str = ""
    study_uid: str = ""
    series_uid: str = ""
    sop_instance_uid: str = ""
    transfer_syntax: str = ""


@dataclass
class SynthSeries:
    series_uid: str
    series_number: int
    series_description: str
    kind: str
    n_files: int
    transfer_syntax: str


@dataclass
class SynthStudy:
    """A study's truth: its labels and what was planted for each positive one (size, side,
    lobe), the report as an ingest run finds it, its PHI (header keyword -> value)."""

    study_uid: str
    accession_number: str
    modality: str
    body_part: str
    labels: dict[str, int]
    report: str
    report_in_sr: bool
    phi: dict[str, str]
    findings: dict[str, dict] = field(default_factory=dict)
    series: list[SynthSeries] = field(default_factory=list)


@dataclass
class SynthArchive:
    root: Path
    reports_csv: Path
    studies: list[SynthStudy]
    files: list[SynthFile]
    phi_values: list[str]

    def files_of(self, kind: str) -> list[SynthFile]:
        return [f for f in self.files if f.kind == kind]

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "reports_csv": str(self.reports_csv),
            "studies": [asdict(s) for s in self.studies],
            "files": [asdict(f) for f in self.files],
            "phi_values": list(self.phi_values),
        }


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _layout(study: Study, series: Series, instance: Dataset) -> str:
    """Where an instance goes; three folder styles seen in real exports."""
    style, number = study.index % 3, instance.InstanceNumber
    if style == 0:
        return f"{study.patient_id}/{study.accession}/{series.number:03d}_{_slug(series.description)}/IM{number:04d}"
    if style == 1:
        return f"{study.uid}/{series.uid}/{instance.SOPInstanceUID}.dcm"
    return f"{study.study_date}_{study.accession}/S{series.number:04d}I{number:04d}.DCM"


_ZIP_DATE = (2020, 1, 1, 0, 0, 0)


class _Writer:
    """Writes the archive's files and records what each one is."""

    def __init__(self, root: Path, scratch: Path):
        self.root, self.scratch, self.files = root, scratch, []

    def put(self, relpath: str, data: bytes, record: SynthFile | None) -> None:
        """Write a file; ``record`` is None for a container whose members are recorded."""
        path = self.root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if record is not None:
            self.files.append(record)

    def write_study(self, study: Study, series_list: list[Series], packaging: str) -> None:
        """Write every instance loose, into one zip, or as a DICOMDIR file set."""
        encoded = [
            (series, instance, data)
            for series in series_list
            for instance, data in zip(series.instances, series_files(series, self.scratch), strict=True)
        ]
        if packaging == "zip":
            self._zip(study, encoded)
        elif packaging == "dicomdir":
            self._file_set(study, encoded)
        else:
            for series, instance, data in encoded:
                relpath = _layout(study, series, instance)
                self.put(relpath, data, _record(relpath, series, instance))

    def _zip(self, study: Study, encoded) -> None:
        relpath = f"zip_exports/{study.accession}.zip"
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for series, instance, data in encoded:
                member = _layout(study, series, instance)
                info = zipfile.ZipInfo(member, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                archive.writestr(info, data)
                self.files.append(_record(relpath, series, instance, member))
        self.put(relpath, buffer.getvalue(), None)

    def _file_set(self, study: Study, encoded) -> None:
        """A CD-style export: DICOMDIR and PT*/ST*/SE*/IM* files written by pydicom's FileSet."""
        file_set = FileSet()
        file_set.ID = "HLIPSYNTH"
        file_set.UID = study.uid_for("fileset")
        for _, _, data in encoded:
            file_set.add(pydicom.dcmread(io.BytesIO(data)))
        folder = self.root / f"cd_export_{study.index}"
        file_set.write(folder)
        self.files.append(SynthFile(f"{folder.name}/DICOMDIR", "dicomdir", study_uid=study.uid))
        written = {instance.SOPInstanceUID: Path(instance.path) for instance in file_set}
        for series, instance, _ in encoded:
            relpath = written[instance.SOPInstanceUID].relative_to(self.root).as_posix()
            self.files.append(_record(relpath, series, instance))


def _record(path: str, series: Series, instance: Dataset, member: str = "") -> SynthFile:
    return SynthFile(
        path,
        series.kind,
        member,
        series.template.StudyInstanceUID,
        series.uid,
        instance.SOPInstanceUID,
        str(series.transfer_syntax),
    )


def _broken_files(writer: _Writer, first: SynthFile, rng: np.random.Generator) -> None:
    """Clutter: a duplicate instance, a truncated one, an empty file, text and binary junk."""
    data = (writer.root / first.path).read_bytes()
    dup = SynthFile(**{**asdict(first), "path": f"duplicates/{Path(first.path).name}", "kind": "duplicate"})
    writer.put(dup.path, data, dup)
    cut = SynthFile(**{**asdict(first), "path": "incoming/partial_transfer.dcm", "kind": "truncated"})
    writer.put(cut.path, data[: int(len(data) * 0.6)], cut)
    writer.put("incoming/EMPTY", b"", SynthFile("incoming/EMPTY", "empty"))
    readme = "Export from PACS. Do not distribute.\nContact the imaging department for questions.\n"
    writer.put("README.txt", readme.encode(), SynthFile("README.txt", "not_dicom"))
    writer.put("incoming/Thumbs.db", rng.bytes(512), SynthFile("incoming/Thumbs.db", "not_dicom"))


def _assign_syntaxes(series_list: list[Series], start: int, cycle: Sequence[UID]) -> None:
    """Series take the syntaxes of ``cycle`` in turn from ``start`` (SR documents: an
    uncompressed one)."""
    for counter, series in enumerate(series_list, start=start):
        series.transfer_syntax = cycle[counter % len(cycle)]
        if series.kind == "sr_report" and series.transfer_syntax.is_compressed:
            series.transfer_syntax = ExplicitVRLittleEndian


def _syntax_cycle(transfer_syntaxes: Sequence[str] | None) -> list[UID]:
    available = available_transfer_syntaxes()
    if transfer_syntaxes is None:
        return [uid for uid in TRANSFER_SYNTAX_CYCLE if uid in available]
    cycle = [UID(uid) for uid in transfer_syntaxes]
    missing = [uid.name for uid in cycle if uid not in available]
    if missing or not cycle:
        raise ValueError(
            f"cannot encode {missing or 'an empty list'}; available: {[u.name for u in available]}"
        )
    return cycle


def _write_reports_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns = ["StudyInstanceUID", "AccessionNumber", "report", *FINDINGS]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _packaging(index: int, n_studies: int) -> str:
    if n_studies >= 4 and index == n_studies - 1:
        return "zip"
    if n_studies >= 4 and index == n_studies - 2:
        return "dicomdir"
    return "loose"


SERIES_STRIDE = 5
"""Study ``i``'s first series takes the syntax at position ``SERIES_STRIDE * i`` of the cycle
and its next series the following ones, so a study's syntaxes do not depend on how many series
the studies before it had (studies are written in parallel); 5 is prime to the cycle's 8, so
consecutive studies start at every position."""


@dataclass
class _Job:
    """What a worker needs to write study ``index`` (module-level and picklable)."""

    root: Path
    seed: int
    n_studies: int
    kind: str
    sizes: Sizes
    cycle: list[UID]


@dataclass
class _Written:
    summary: SynthStudy
    row: dict[str, Any]
    files: list[SynthFile]
    phi: list[str]


def _write_study(job: _Job, index: int) -> _Written:
    """Plan, render, encode and write one study; deterministic in ``(seed, index)``."""
    study = plan_study(index, job.seed, job.kind, job.sizes)
    series_list = ct_series(study, job.sizes) if study.modality == "CT" else mr_series(study, job.sizes)
    sections = report_sections(study)
    text = report_text(sections, capitals=study.index % 4 < 2)
    if study.report_in_sr:
        series_list.append(sr_report(study, sections))
        text = sr_text(series_list[-1].template)
    _assign_syntaxes(series_list, SERIES_STRIDE * index, job.cycle)
    with tempfile.TemporaryDirectory(prefix="hlip-synth-") as scratch:
        writer = _Writer(job.root, Path(scratch))
        writer.write_study(study, series_list, _packaging(index, job.n_studies))
    row = _csv_row(study, "" if study.report_in_sr else text)
    return _Written(_summary(study, series_list, text), row, writer.files, phi_variants(study))


def make_archive(
    out_dir: str | Path,
    n_studies: int = 12,
    seed: int = 0,
    *,
    modalities: Sequence[str] = ("CT", "MR"),
    sizes: Sizes | None = None,
    ct_matrix: int | None = None,
    transfer_syntaxes: Sequence[str] | None = None,
    workers: int = 0,
) -> SynthArchive:
    """Write a synthetic uncurated archive of ``n_studies`` studies into ``out_dir`` (which
    must be empty or absent) and ``out_dir/reports.csv``; the same arguments give the same
    bytes, written in this process (``workers=0``) or by that many processes side by side.

    Studies take the kinds in ``modalities`` in turn (:data:`~hlip.synth.findings.STUDY_KINDS`:
    ``"CT"`` chest CT, ``"MR"`` brain MR, ``"CT-HEAD"`` head CT). Features rotate over studies, so any archive of
    4 or more studies (2 of each modality) has every kind of file in :data:`KINDS`: every third
    study carries its report in an SR, the last study is a zip export, the one before it a
    DICOMDIR file set; both SR classes (Basic Text, Enhanced) appear from 6 studies on.
    ``ct_matrix`` is a shortcut for ``Sizes(ct_matrix=...)``. Image series take the
    ``transfer_syntaxes`` in turn (default: :data:`TRANSFER_SYNTAX_CYCLE`, where encodable;
    :data:`SERIES_STRIDE`); ``[ExplicitVRLittleEndian]`` gives an uncompressed archive.
    """
    root = Path(out_dir).absolute()  # files are written, and recorded, relative to it
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; a synthetic archive needs an empty directory")
    root.mkdir(parents=True, exist_ok=True)
    sizes = sizes or Sizes()
    if ct_matrix is not None:
        sizes = Sizes(**{**asdict(sizes), "ct_matrix": ct_matrix})
    cycle = _syntax_cycle(transfer_syntaxes)
    jobs = [
        _Job(root, seed, n_studies, modalities[i % len(modalities)], sizes, cycle) for i in range(n_studies)
    ]
    if workers > 0:
        with ProcessPoolExecutor(min(workers, n_studies)) as pool:
            written = list(pool.map(_write_study, jobs, range(n_studies), chunksize=4))
    else:
        written = [_write_study(job, index) for index, job in enumerate(jobs)]
    files = [file for study in written for file in study.files]
    if files:
        writer = _Writer(root, root)
        first = next(f for f in files if f.kind in SCAN_KINDS and not f.member)
        _broken_files(writer, first, np.random.default_rng([seed, n_studies, 99]))
        files += writer.files
    _write_reports_csv(root / "reports.csv", [study.row for study in written])
    phi = list(dict.fromkeys(value for study in written for value in study.phi))
    return SynthArchive(root, root / "reports.csv", [study.summary for study in written], files, phi)


def _csv_row(study: Study, text: str) -> dict[str, Any]:
    row: dict[str, Any] = {"StudyInstanceUID": study.uid, "AccessionNumber": study.accession, "report": text}
    row.update({label: study.labels.get(label, "") for label in FINDINGS})
    return row


def _summary(study: Study, series_list: list[Series], text: str) -> SynthStudy:
    return SynthStudy(
        study_uid=study.uid,
        accession_number=study.accession,
        modality=study.modality,
        body_part=study.body_part,
        labels=dict(study.labels),
        report=text,
        report_in_sr=study.report_in_sr,
        phi=phi_strings(study),
        findings={label: dict(detail) for label, detail in study.details.items()},
        series=[
            SynthSeries(s.uid, s.number, s.description, s.kind, len(s.instances), str(s.transfer_syntax))
            for s in series_list
        ],
    )
