"""The DICOM series of a study: CT (localizer, axial, tilted, reformats, dose screen), MR
(3-plane localizer, T1, T2, FLAIR) and the SR carrying the report, as shared templates plus
per-instance elements and stored frames."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)

from hlip.synth.studies import Sizes, Study
from hlip.synth.volumes import AXIAL, CORONAL, SAGITTAL, Grid, sample, stack, tilted


@dataclass
class Series:
    """One series to write: ``template`` holds the elements every instance shares, each of
    ``instances`` the elements of one instance (SOP Instance UID, number, position), and
    ``pixels[i]`` is instance i's stored frame (None for objects without pixels)."""

    number: int
    description: str
    kind: str
    uid: str
    template: Dataset
    instances: list[Dataset] = field(default_factory=list)
    pixels: np.ndarray | None = None
    transfer_syntax: UID = ExplicitVRLittleEndian

    def add_instance(self, study: Study, number: int, grid: Grid | None = None, k: int = 0) -> None:
        ds = Dataset()
        ds.SOPInstanceUID = study.uid_for(self.number, number)
        ds.InstanceNumber = number
        if grid is not None:
            ds.ImagePositionPatient = [round(float(v), 4) for v in grid.positions[k]]
            ds.ImageOrientationPatient = grid.orientation
            ds.PixelSpacing = [round(grid.spacing[0], 6), round(grid.spacing[1], 6)]
            ds.SliceLocation = round(float(grid.positions[k] @ np.cross(grid.row_dir, grid.col_dir)), 4)
        self.instances.append(ds)


def _new_series(study: Study, number: int, description: str, kind: str, sop_class: str) -> Series:
    """A series with the patient, study, series and equipment modules (fake PHI included)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = "SR" if kind == "sr_report" else study.modality
    ds.Manufacturer, ds.ManufacturerModelName = study.scanner[0], study.scanner[1]
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring.pn
    ds.NameOfPhysiciansReadingStudy = study.reader.pn
    ds.StudyDescription = _exam_name(study)
    ds.SeriesDescription = description
    ds.PatientName = study.patient.pn
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{int(study.study_date[:4]) - int(study.birth_date[:4]):03d}Y"
    ds.BodyPartExamined = study.body_part
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = study.uid_for("series", number)
    ds.StudyID = str(1000 + study.index)
    ds.SeriesNumber = number
    return Series(number, description, kind, ds.SeriesInstanceUID, ds)


def _exam_name(study: Study) -> str:
    if study.modality == "MR":
        return "MRI BRAIN WITHOUT CONTRAST"
    if study.body_part == "HEAD":
        return "CT HEAD WITHOUT CONTRAST"
    return "CT CHEST WITH CONTRAST" if study.contrast else "CT CHEST WITHOUT CONTRAST"


def _image_modules(
    series: Series, study: Study, image_type: list[str], pixels: np.ndarray, bits_stored: int
) -> None:
    """General, plane and pixel modules shared by the series' images; ``pixels`` is (n, rows, cols)."""
    ds = series.template
    ds.ImageType = image_type
    if series.kind != "dose_report":
        ds.FrameOfReferenceUID = study.frame_uid
        ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    series.pixels = pixels


@dataclass(frozen=True)
class _CTStorage:
    """How a scanner stores HU: ``stored = HU - intercept`` (slope 1) in ``dtype``."""

    dtype: type
    bits_stored: int
    intercept: float

    def encode(self, hu: np.ndarray) -> np.ndarray:
        low, high = (0, 2**self.bits_stored - 1) if self.dtype is np.uint16 else (-(2**15), 2**15 - 1)
        return np.clip(np.rint(hu - self.intercept), low, high).astype(self.dtype)


CT_STORAGES = (
    _CTStorage(np.uint16, 12, -1024.0),
    _CTStorage(np.int16, 16, 0.0),
    _CTStorage(np.int16, 16, -1024.0),
)

MR_SEQUENCES = {
    "T1": dict(ScanningSequence="SE", SequenceVariant="SP", RepetitionTime=500.0, EchoTime=10.0),
    "T2": dict(ScanningSequence="SE", SequenceVariant="SK", RepetitionTime=4000.0, EchoTime=100.0),
    "FLAIR": dict(ScanningSequence=["SE", "IR"], SequenceVariant="SK", RepetitionTime=9000.0, EchoTime=120.0, InversionTime=2500.0),
}  # fmt: skip


def ct_series(study: Study, sizes: Sizes) -> list[Series]:
    fov = float(study.rng.uniform(220, 260) if study.body_part == "HEAD" else study.rng.uniform(350, 400))
    pixel = fov / sizes.ct_matrix
    center = (0.0, 0.0, study.z0)
    square = (sizes.ct_matrix, sizes.ct_matrix)
    reformat_shape = (int(round(sizes.ct_coverage_mm / pixel)), sizes.ct_matrix)
    tilt = 15.0 if study.variant % 3 == 1 else 0.0
    thick_n = int(round(sizes.ct_coverage_mm / sizes.ct_thick_mm))
    thin_n = int(round(sizes.ct_coverage_mm / sizes.ct_thin_mm))
    thick = stack(
        center,
        *(tilted(tilt) if tilt else AXIAL),
        square,
        pixel,
        thick_n,
        sizes.ct_thick_mm,
        sizes.ct_thick_mm,
        (0, 0, 1),
    )
    thin = stack(center, *AXIAL, square, pixel, thin_n, sizes.ct_thin_mm, sizes.ct_thin_mm)
    axial, reformat = ["ORIGINAL", "PRIMARY", "AXIAL"], ["DERIVED", "SECONDARY", "REFORMATTED"]
    series = [
        _ct_localizer(study, sizes),
        _ct_stack(
            study,
            2,
            f"Axial {sizes.ct_thick_mm:g}mm",
            "ct_axial_tilted" if tilt else "ct_axial_thick",
            thick,
            axial,
            tilt,
        ),
        _ct_stack(study, 3, f"Axial {sizes.ct_thin_mm:g}mm", "ct_axial_thin", thin, axial),
        _ct_stack(
            study,
            601,
            "Coronal MPR 5mm",
            "ct_reformat",
            stack(center, *CORONAL, reformat_shape, pixel, 48, 5.0, 5.0),
            reformat,
        ),
    ]
    if study.variant % 2 == 0:
        sagittal = stack(center, *SAGITTAL, reformat_shape, pixel, int(fov * 0.8 / 5), 5.0, 5.0)
        series.append(_ct_stack(study, 602, "Sagittal MPR 5mm", "ct_reformat", sagittal, reformat))
    series.append(_dose_report(study))
    return series


def _ct_template(study: Study, series: Series, storage: _CTStorage) -> None:
    ds = series.template
    ds.KVP = 120
    ds.ConvolutionKernel = study.scanner[2]
    if study.contrast:
        ds.ContrastBolusAgent = "Iohexol 350"
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = storage.intercept, 1.0, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400


def _ct_stack(study, number, description, kind, grid: Grid, image_type, tilt: float = 0.0) -> Series:
    """A CT series in HU with the scanner's calibration offset and noise (the archive's draw);
    in odd studies InstanceNumber runs against the slice order."""
    series = _new_series(study, number, description, kind, CTImageStorage)
    storage = CT_STORAGES[study.index % len(CT_STORAGES)]
    noise = np.random.default_rng([study.index, number, 7])
    hu = sample(study.phantom, grid, study.hu)
    model = study.scanner[1]
    hu += study.style.ct_offset_hu[model] + noise.normal(0, study.style.ct_noise_hu[model], hu.shape).astype(
        np.float32
    )
    _image_modules(series, study, image_type, storage.encode(hu), storage.bits_stored)
    _ct_template(study, series, storage)
    series.template.SliceThickness = grid.thickness
    series.template.GantryDetectorTilt = tilt
    n = len(grid.positions)
    for k in range(n):
        series.add_instance(study, n - k if study.variant % 2 else k + 1, grid, k)
    return series


def _ct_localizer(study: Study, sizes: Sizes) -> Series:
    """Topograms (projections): AP, and a lateral one in every other study."""
    series = _new_series(study, 1, "Topogram 0.6", "localizer", CTImageStorage)
    cols = min(sizes.ct_matrix, 256)
    pixel = 500.0 / cols
    shape = (int(round((sizes.ct_coverage_mm + 120) / pixel)), cols)
    views = [(CORONAL, 1)] + ([(SAGITTAL, 0)] if study.variant % 2 else [])
    grids, images = [], []
    for orientation, depth_axis in views:
        grid = stack((0.0, 0.0, study.z0), *orientation, shape, pixel, 1, 0.0, 1.0)
        depth = np.linspace(-200, 200, 40, dtype=np.float32)
        xyz = [c[0, ..., None] for c in grid.coordinates(0, 1)]
        xyz[depth_axis] = xyz[depth_axis] + depth
        mu = np.clip(study.hu[study.phantom.labels(xyz)] + 1000.0, 0, None) / 1000.0
        images.append(np.clip(mu.sum(axis=2) * 100, 0, 4095).astype(np.uint16))
        grids.append(grid)
    _image_modules(series, study, ["ORIGINAL", "PRIMARY", "LOCALIZER"], np.stack(images), 12)
    series.template.KVP = 120
    series.template.SliceThickness = 1.0
    for instance, grid in enumerate(grids, start=1):
        series.add_instance(study, instance, grid)
    return series


def _dose_report(study: Study) -> Series:
    """A dose screen: a Secondary Capture with rows of glyph-like blocks (burned-in text)."""
    series = _new_series(study, 999, "Dose Report", "dose_report", SecondaryCaptureImageStorage)
    rng = np.random.default_rng([study.index, 999])
    image = np.zeros((1, 192, 256), np.uint8)
    for line in range(12):
        for char in range(int(rng.integers(10, 30))):
            glyph = (rng.random((7, 5)) < 0.45) * np.uint8(230)
            image[0, 8 + line * 14 : 15 + line * 14, 8 + char * 8 : 13 + char * 8] = glyph
    _image_modules(series, study, ["DERIVED", "SECONDARY"], image, 8)
    series.template.ConversionType = "WSD"
    series.template.BurnedInAnnotation = "YES"
    series.add_instance(study, 1)
    return series


def mr_series(study: Study, sizes: Sizes) -> list[Series]:
    m = sizes.mr_matrix
    pixel = float(study.rng.uniform(230, 250)) / m
    gain = float(study.rng.uniform(0.6, 1.6))
    center = (0.0, 0.0, study.z0 + 5)
    angle = float(study.rng.uniform(8, 15)) if study.variant % 2 else 0.0
    axial = tilted(-angle) if angle else AXIAL
    axial_shape = (m, int(round(m * 0.875)))
    return [
        _mr_localizer(study, sizes),
        _mr_stack(
            study,
            2,
            "T1 SE sag",
            "mr_t1",
            stack(center, *SAGITTAL, (m, m), pixel, 36, 4.0, 4.0),
            "T1",
            np.uint16,
            gain,
        ),
        _mr_stack(
            study,
            3,
            "T2 TSE ax",
            "mr_t2",
            stack(center, *axial, axial_shape, pixel, 26, 6.0, 5.0),
            "T2",
            np.int16,
            gain,
        ),
        _mr_stack(
            study,
            4,
            "FLAIR ax",
            "mr_flair",
            stack(center, *axial, axial_shape, pixel, 26, 6.0, 5.0),
            "FLAIR",
            np.uint16,
            gain,
        ),
    ]


def _mr_signal(study: Study, grids: Sequence[Grid], weighting: str, gain: float, noise) -> np.ndarray:
    """Magnitude images: tissue signal times the receiver gain, plus Rician-like noise, 12 bits."""
    tissue = study.style.mr_signal(weighting)
    signal = np.concatenate([sample(study.phantom, g, tissue) for g in grids]) * gain
    sigma = 18 * gain * study.style.mr_noise[study.scanner[1]]
    signal = np.abs(signal + noise.normal(0, sigma, signal.shape).astype(np.float32))
    return np.clip(np.rint(signal), 0, 4095)


def _mr_template(study: Study, series: Series, weighting: str, gain: float, thickness: float) -> None:
    ds = series.template
    for keyword, value in MR_SEQUENCES[weighting].items():
        setattr(ds, keyword, value)
    ds.MRAcquisitionType = "2D"
    ds.MagneticFieldStrength = study.scanner[2]
    ds.SliceThickness = thickness
    ds.WindowCenter, ds.WindowWidth = int(900 * gain), int(1800 * gain)


def _mr_stack(study, number, description, kind, grid: Grid, weighting: str, dtype, gain: float) -> Series:
    series = _new_series(study, number, description, kind, MRImageStorage)
    noise = np.random.default_rng([study.index, number, 7])
    pixels = _mr_signal(study, [grid], weighting, gain, noise).astype(dtype)
    _image_modules(
        series, study, ["ORIGINAL", "PRIMARY", "M", "ND"], pixels, 16 if pixels.dtype.kind == "i" else 12
    )
    _mr_template(study, series, weighting, gain, grid.thickness)
    steps = np.linalg.norm(np.diff(grid.positions, axis=0), axis=1)
    series.template.SpacingBetweenSlices = round(float(steps[0]), 4) if len(steps) else grid.thickness
    for k in range(len(grid.positions)):
        series.add_instance(study, k + 1, grid, k)
    return series


def _mr_localizer(study: Study, sizes: Sizes) -> Series:
    """One image per plane in one series; flagged LOCALIZER in ImageType in even studies only,
    as not every scanner does."""
    flagged = study.variant % 2 == 0
    series = _new_series(study, 1, "localizer" if flagged else "3-plane loc", "localizer", MRImageStorage)
    pixel = 260.0 / sizes.mr_matrix
    grids = [
        stack((0.0, 0.0, study.z0), *o, (sizes.mr_matrix,) * 2, pixel, 1, 0.0, 8.0)
        for o in (SAGITTAL, CORONAL, AXIAL)
    ]
    pixels = _mr_signal(study, grids, "T1", 1.0, np.random.default_rng([study.index, 1, 7])).astype(np.uint16)
    image_type = ["ORIGINAL", "PRIMARY", "LOCALIZER"] if flagged else ["ORIGINAL", "PRIMARY", "M", "ND"]
    _image_modules(series, study, image_type, pixels, 12)
    _mr_template(study, series, "T1", 1.0, 8.0)
    for instance, grid in enumerate(grids, start=1):
        series.add_instance(study, instance, grid)
    return series


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _content(relationship: str, value_type: str, concept: Dataset, **values) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = relationship, value_type
    item.ConceptNameCodeSequence = [concept]
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def sr_report(study: Study, sections: list[tuple[str, str]]) -> Series:
    """The report as an SR document (TID 2000 style): History, Findings and Impressions
    containers of TEXT items, and the reader as observer context (a PNAME, left out of the text)."""
    sop_class = EnhancedSRStorage if study.variant % 2 else BasicTextSRStorage
    series = _new_series(study, 900, "Radiology Report", "sr_report", sop_class)
    ds = series.template
    containers = {
        "CLINICAL INFORMATION": ("121060", "History"),
        "FINDINGS": ("121070", "Findings"),
        "IMPRESSION": ("121072", "Impressions"),
    }
    items = {
        "121060": ("121060", "History"),
        "121070": ("121071", "Finding"),
        "121072": ("121073", "Impression"),
    }
    content = [
        _content(
            "HAS OBS CONTEXT",
            "CODE",
            _code("121005", "DCM", "Observer Type"),
            ConceptCodeSequence=[_code("121006", "DCM", "Person")],
        ),
        _content(
            "HAS OBS CONTEXT",
            "PNAME",
            _code("121008", "DCM", "Person Observer Name"),
            PersonName=study.reader.pn,
        ),
    ]
    for heading, text in sections:
        if heading in containers:
            code, name = containers[heading]
            item_code, item_name = items[code]
            paragraphs = [
                _content("CONTAINS", "TEXT", _code(item_code, "DCM", item_name), TextValue=p)
                for p in text.split("\n")
                if p
            ]
            content.append(
                _content(
                    "CONTAINS",
                    "CONTAINER",
                    _code(code, "DCM", name),
                    ContinuityOfContent="SEPARATE",
                    ContentSequence=paragraphs,
                )
            )
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic Imaging Report")]
    ds.ContinuityOfContent = "SEPARATE"
    ds.ContentTemplateSequence = [Dataset()]
    ds.ContentTemplateSequence[0].MappingResource, ds.ContentTemplateSequence[0].TemplateIdentifier = (
        "DCMR",
        "2000",
    )
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ReferencedPerformedProcedureStepSequence = []
    ds.PerformedProcedureCodeSequence = []
    ds.ContentSequence = content
    series.add_instance(study, 1)
    return series
