"""Synthetic uncurated DICOM archives: phantom CT and MR studies with planted findings,
their radiology reports, and the clutter of a real hospital export.

:func:`make_archive` writes, deterministically for a seed (same bytes):

* chest CT studies (thin and thick axial, coronal and sagittal reformats, localizers, a dose
  screen secondary capture), head CT studies (the same series over a head) and brain MR
  studies (3-plane localizer, T1, T2, FLAIR), each
  image sampled from an analytic phantom in patient coordinates (LPS, mm), so every series,
  whatever its orientation, tilt or grid, shows the same anatomy and findings;
* findings (:data:`FINDINGS`) planted in the phantom, positive in about 45% of the studies
  of their modality, independently, and stated (or negated) in the report;
* a style per seed (:mod:`~hlip.synth.style`): the report wording, lesion size ranges,
  lesion intensities and scanner calibrations of the whole archive, so that two seeds are two
  hospitals;
* ``reports.csv``: StudyInstanceUID, AccessionNumber, report, one 0/1 column per finding
  (empty for the other modality's findings); for some studies the report lives in a DICOM
  SR object instead and the CSV cell is empty;
* fake PHI in the headers (names, IDs, dates, institution) that the reports repeat in
  varied formats, so that de-identification has work to do;
* mixed transfer syntaxes, gantry tilt, oblique MR, non-square and reformatted grids,
  nested folders, files without extension, a zip export, a DICOMDIR file set, a duplicate
  instance, and broken files (truncated, empty, not DICOM).

The returned :class:`SynthArchive` lists every file with its kind and every PHI string, so
tests can check what an ingest run made of each file and grep its outputs for PHI.

Modules, in the order a study is made: :mod:`~hlip.synth.style` (the archive's draw),
:mod:`~hlip.synth.volumes` (tissues, phantoms, image grids), :mod:`~hlip.synth.findings` (what can be planted, and how),
:mod:`~hlip.synth.anatomy` (chest and head), :mod:`~hlip.synth.studies` (study plans),
:mod:`~hlip.synth.series` (DICOM series), :mod:`~hlip.synth.reports` (report text),
:mod:`~hlip.synth.encoding` (file bytes per transfer syntax), :mod:`~hlip.synth.archive`
(writing it all).
"""

from hlip.synth.archive import (
    KINDS,
    SCAN_KINDS,
    SynthArchive,
    SynthFile,
    SynthSeries,
    SynthStudy,
    make_archive,
)
from hlip.synth.encoding import TRANSFER_SYNTAX_CYCLE, available_transfer_syntaxes
from hlip.synth.findings import FINDINGS, PREVALENCE, STUDY_KINDS, Finding
from hlip.synth.reports import NORMAL_SENTENCES
from hlip.synth.studies import Sizes

__all__ = [
    "FINDINGS",
    "KINDS",
    "NORMAL_SENTENCES",
    "PREVALENCE",
    "SCAN_KINDS",
    "STUDY_KINDS",
    "TRANSFER_SYNTAX_CYCLE",
    "Finding",
    "Sizes",
    "SynthArchive",
    "SynthFile",
    "SynthSeries",
    "SynthStudy",
    "available_transfer_syntaxes",
    "make_archive",
]
