"""Planning rules on hand-made index tables (no files, no pixels)."""

from __future__ import annotations

import random
from itertools import count
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hlip.ingest import geometry
from hlip.ingest.index import rows_to_table
from hlip.ingest.plan import REASONS, Plan, PlanConfig, plan

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
_uids = count(1)


def image_row(file_id: str, z: float = 0.0, **fields) -> dict:
    """One readable classic image row; ``z`` moves the slice along the IOP normal."""
    iop = fields.pop("iop", AXIAL)
    origin = np.asarray(fields.pop("origin", (0.0, 0.0, 0.0)))
    row = {
        "file_id": file_id,
        "path": file_id,
        "member": "",
        "size": 1000,
        "SOPClassUID": CT,
        "SOPInstanceUID": f"1.2.3.{next(_uids)}",
        "StudyInstanceUID": "1.1",
        "SeriesInstanceUID": "1.1.1",
        "SeriesNumber": 1,
        "Modality": "CT",
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "Rows": 4,
        "Columns": 4,
        "PixelSpacing": [0.5, 0.5],
        "ImageOrientationPatient": list(iop),
        "ImagePositionPatient": list(origin + z * geometry.slice_normal(iop)),
        "HasPixelData": True,
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
    }
    row.update(fields)
    return row


def series(prefix: str, n: int, step: float = 2.0, **fields) -> list[dict]:
    return [image_row(f"{prefix}/{i:03d}", z=i * step, InstanceNumber=n - i, **fields) for i in range(n)]


def run(rows: list[dict], **config) -> Plan:
    result = plan(rows_to_table(rows), PlanConfig(**config))
    assert_every_file_has_one_outcome(rows, result)
    return result


def assert_every_file_has_one_outcome(rows: list[dict], result: Plan) -> None:
    scanned = {f for study in result.studies for scan in study.scans for f in scan.files}
    reported = {f for study in result.studies for f in study.report_files}
    rejected = [r.file_id for r in result.rejects]
    assert len(rejected) == len(set(rejected))
    assert not (scanned & reported) and not (scanned & set(rejected)) and not (reported & set(rejected))
    assert scanned | reported | set(rejected) == {r["file_id"] for r in rows}
    assert all(r.reason in REASONS for r in result.rejects)
    assert set(result.outcomes()) == {r["file_id"] for r in rows}


def scans(result: Plan) -> list:
    return [scan for study in result.studies for scan in study.scans]


def reasons(result: Plan) -> dict[str, str]:
    return {r.file_id: r.reason for r in result.rejects}


# --------------------------------------------------------------------------- stacks


def test_series_is_sorted_along_the_normal_not_by_instance_number():
    rows = series("a", 6)
    random.Random(0).shuffle(rows)
    (scan,) = scans(run(rows))
    assert scan.files == [f"a/{i:03d}" for i in range(6)]
    offsets = [np.dot(s.position, geometry.slice_normal(AXIAL)) for s in scan.slices]
    assert offsets == sorted(offsets)
    assert scan.slice_step == pytest.approx(2.0)
    assert not scan.tilted and not scan.uneven_spacing


@pytest.mark.parametrize("iop", [AXIAL, CORONAL, SAGITTAL, (0.0, 1.0, 0.0, 1.0, 0.0, 0.0)])
def test_any_orientation_sorts_along_its_own_normal(iop):
    rows = series("a", 5, iop=iop, origin=(10.0, -20.0, 30.0))
    random.Random(1).shuffle(rows)
    (scan,) = scans(run(rows))
    assert scan.files == [f"a/{i:03d}" for i in range(5)]


def test_one_series_uid_with_several_series_numbers_gives_several_scans():
    rows = [*series("a", 5, SeriesNumber=1), *series("b", 5, SeriesNumber=2)]
    result = run(rows)
    assert sorted(s.name for s in scans(result)) == ["1", "2"]
    assert len(result.studies) == 1


def test_stacks_split_by_shape_spacing_and_orientation():
    oblique = (1.0, 0.0, 0.0, 0.0, np.cos(0.3), np.sin(0.3))
    rows = [
        *series("a", 5),
        *series("b", 5, Rows=8),
        *series("c", 5, PixelSpacing=[0.7, 0.7]),
        *series("d", 5, iop=oblique, origin=(0, 0, 100.0)),
    ]
    result = run(rows)
    assert len(scans(result)) == 4
    assert len({s.name for s in scans(result)}) == 4


def test_echoes_and_phase_are_separate_scans_named_by_suffix():
    rows = []
    for echo in (1, 2):
        rows += series(f"m{echo}", 5, EchoNumbers=echo, SOPClassUID=MR, Modality="MR")
        rows += series(
            f"p{echo}",
            5,
            EchoNumbers=echo,
            SOPClassUID=MR,
            Modality="MR",
            ImageType=["ORIGINAL", "PRIMARY", "PHASE MAP", "P", "FFE"],
        )
    names = sorted(s.name for s in scans(run(rows)))
    assert names == ["1_e1", "1_e1_ph", "1_e2", "1_e2_ph"]


def test_repeated_positions_become_volumes_in_temporal_order():
    rows = []
    for t in range(3):
        for i in range(5):
            rows.append(
                image_row(f"f/{t}{i}", z=i * 3.0, TemporalPositionIdentifier=3 - t, InstanceNumber=t * 5 + i)
            )
    result = run(rows)
    volumes = sorted(scans(result), key=lambda s: s.volume_index)
    assert [s.name for s in volumes] == ["1_t0", "1_t1", "1_t2"]
    # TemporalPositionIdentifier decides the order: t=2 has the smallest identifier.
    assert volumes[0].files == [f"f/2{i}" for i in range(5)]
    assert all(s.volume_count == 3 for s in volumes)


def test_max_volumes_per_series_rejects_later_time_points():
    rows = [image_row(f"f/{t}{i}", z=i * 3.0, InstanceNumber=t * 5 + i) for t in range(3) for i in range(5)]
    result = run(rows, max_volumes_per_series=1)
    assert [s.name for s in scans(result)] == ["1_t0"]
    assert set(reasons(result).values()) == {"extra_volume"}


def test_single_position_is_not_a_volume():
    rows = [image_row(f"n/{i}", z=0.0, AcquisitionNumber=i) for i in range(4)]
    assert set(reasons(run(rows)).values()) == {"not_a_volume"}


def test_unequal_images_per_position_are_refused():
    rows = [*series("a", 6), image_row("extra", z=2.0)]
    assert set(reasons(run(rows)).values()) == {"inconsistent_slice_count"}


def test_too_few_slices_follows_the_config():
    rows = series("a", 4)
    assert set(reasons(run(rows)).values()) == {"too_few_slices"}
    assert len(scans(run(rows, min_slices=4))) == 1


def test_gap_larger_than_gap_factor_is_missing_slices():
    rows = [image_row(f"g/{i}", z=z) for i, z in enumerate([0, 5, 10, 15, 25, 30])]
    assert set(reasons(run(rows)).values()) == {"missing_slices"}
    assert len(scans(run(rows, gap_factor=2.5))) == 1


def z_positions(steps) -> list[float]:
    return [float(z) for z in np.concatenate([[0.0], np.cumsum(steps)])]


@settings(max_examples=60, deadline=None)
@given(
    st.floats(1.0, 8.0),
    st.floats(1.25, 3.0),
    st.integers(2, 12),
    st.integers(2, 12),
    st.booleans(),
)
def test_two_spacing_regimes_are_kept_as_one_scan(first_step, ratio, n_first, n_second, finer_first):
    """GE sequential head CT: n1 steps of one spacing, then n2 of another (none missing)."""
    a, b = (first_step, first_step * ratio) if finer_first else (first_step * ratio, first_step)
    zs = z_positions([a] * n_first + [b] * n_second)
    result = run([image_row(f"r/{i:03d}", z=z) for i, z in enumerate(zs)], min_slices=3)
    (scan,) = scans(result)
    assert reasons(result) == {} and len(scan.slices) == len(zs)
    assert scan.spacing_rule == "regimes" and scan.uneven_spacing


@settings(max_examples=60, deadline=None)
@given(st.floats(0.5, 8.0), st.integers(3, 10), st.integers(3, 10), st.integers(1, 3))
def test_an_isolated_step_of_k_times_the_spacing_is_missing_slices(step, before, after, missing):
    """An even series with ``missing`` consecutive files gone: one step of (missing + 1) x."""
    zs = z_positions([step] * before + [step * (missing + 1)] + [step] * after)
    result = run([image_row(f"m/{i:03d}", z=z) for i, z in enumerate(zs)], min_slices=3)
    assert scans(result) == []
    assert set(reasons(result).values()) == {"missing_slices"}
    assert all("rule: gap" in reject.message for reject in result.rejects)


def test_ge_sequential_head_ct_with_a_posterior_fossa_region_is_kept():
    zs = z_positions([4.002] * 14 + [6.999] * 9)  # the real case: 4 mm, then 7 mm, tilted
    tilt = np.deg2rad(15.0)
    iop = (1.0, 0.0, 0.0, 0.0, float(np.cos(tilt)), float(-np.sin(tilt)))
    table = np.array([0.0, 0.0, 1.0])  # the table moves along z; the slice plane is tilted
    along_normal = float(geometry.slice_normal(iop) @ table)
    rows = [
        image_row(f"ge/{i:03d}", iop=iop, origin=tuple(z / along_normal * table)) for i, z in enumerate(zs)
    ]
    (scan,) = scans(run(rows))
    assert scan.spacing_rule == "regimes" and scan.tilted


def test_uneven_spacing_is_flagged_not_rejected():
    rows = [image_row(f"u/{i}", z=z) for i, z in enumerate([0, 2, 4, 6.8, 8, 10])]
    (scan,) = scans(run(rows))
    assert scan.uneven_spacing


def test_gantry_tilt_is_flagged():
    tilt = np.deg2rad(15)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt))
    rows = [image_row(f"t/{i}", iop=iop, ImagePositionPatient=[0.0, 0.0, 5.0 * i]) for i in range(6)]
    (scan,) = scans(run(rows))
    assert scan.tilted
    assert scan.slice_step == pytest.approx(5.0 * np.cos(tilt))


# --------------------------------------------------------------------------- file rules


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "secondary_capture"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.11.1"}, "presentation_state"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.67"}, "dose_report"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.66"}, "raw_data"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.104.1"}, "encapsulated_document"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.6.1"}, "unsupported_sop_class"),
        ({"SOPClassUID": None, "Modality": "OT"}, "unsupported_sop_class"),
        ({"HasPixelData": False}, "no_pixel_data"),
        ({"BurnedInAnnotation": "YES"}, "burned_in_annotation"),
        ({"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB"}, "not_grayscale"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
        ({"SeriesDescription": "Head Scout"}, "localizer"),
        ({"ProtocolName": "AAHead_Scout"}, "localizer"),
        ({"SeriesDescription": "3-Plane Localizer"}, "localizer"),
        ({"SeriesDescription": "Dose Report"}, "dose_screen"),
        ({"ImageType": ["DERIVED", "SECONDARY", "SCREEN SAVE"]}, "dose_screen"),
        ({"ConversionType": "WSD"}, "secondary_capture"),
        ({"ImagePositionPatient": None}, "missing_geometry"),
        ({"PixelSpacing": None}, "missing_geometry"),
        ({"ImageOrientationPatient": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]}, "invalid_geometry"),
        ({"PixelSpacing": [0.0, 1.0]}, "invalid_geometry"),
        ({"IsDICOMDIR": True}, "dicomdir"),
        ({"error": "truncated: pixel data cut"}, "truncated"),
        ({"error": "empty: zero-byte file"}, "empty"),
        ({"error": "not_dicom: no DICM"}, "not_dicom"),
        ({"error": "weird failure"}, "unreadable"),
    ],
)
def test_file_level_rules(fields, reason):
    rows = [*series("a", 5), image_row("odd", z=100.0, SeriesNumber=9, **fields)]
    result = run(rows)
    assert reasons(result) == {"odd": reason}
    assert len(scans(result)) == 1


@pytest.mark.parametrize(
    "fields",
    [
        {"SeriesDescription": "LOW DOSE CHEST 1.25mm"},
        {"ImageType": ["DERIVED", "SECONDARY", "REFORMATTED"], "SeriesDescription": "Cor MPR"},
        {"ProtocolName": "Head without contrast"},
    ],
)
def test_ordinary_series_are_not_mistaken_for_captures_or_localizers(fields):
    assert len(scans(run(series("a", 5, **fields)))) == 1


def test_classic_images_without_sop_class_are_accepted_by_modality():
    rows = series("a", 5, SOPClassUID=None, Modality="MR")
    assert len(scans(run(rows))) == 1


def test_duplicate_instance_keeps_the_first_file_id():
    rows = series("a", 5)
    copy = dict(rows[2], file_id="z/copy", path="z/copy")
    result = run([*rows, copy])
    assert reasons(result) == {"z/copy": "duplicate_instance"}
    assert "a/002" in scans(result)[0].files


def test_three_plane_localizer_without_hints_is_rejected():
    rows = [
        *series("ax", 7),
        *series("co", 7, iop=CORONAL),
        *series("sa", 7, iop=SAGITTAL),
        *series("real", 6, SeriesNumber=2, SeriesInstanceUID="1.1.2"),
    ]
    result = run(rows)
    assert [s.name for s in scans(result)] == ["2"]
    assert {f: r for f, r in reasons(result).items()} == {r["file_id"]: "localizer" for r in rows[:21]}


def test_reports_attach_to_their_study_or_are_rejected():
    sr = "1.2.840.10008.5.1.4.1.1.88.33"
    rows = [
        *series("a", 5),
        image_row("report", SOPClassUID=sr, Modality="SR", HasPixelData=False),
        image_row("orphan", SOPClassUID=sr, Modality="SR", StudyInstanceUID="9.9", HasPixelData=False),
    ]
    result = run(rows)
    assert result.studies[0].report_files == ["report"]
    assert reasons(result) == {"orphan": "report_without_images"}
    assert result.outcomes()["report"] == ("report", "1.1")


def test_studies_group_scans_and_carry_accession_and_modality():
    rows = [
        *series("a", 5, StudyInstanceUID="2.1", AccessionNumber="ACC1"),
        *series("b", 5, StudyInstanceUID="2.2", SeriesInstanceUID="2.2.1", SOPClassUID=MR, Modality="MR"),
    ]
    result = run(rows)
    assert [(s.study_uid, s.accession_number, s.modality) for s in result.studies] == [
        ("2.1", "ACC1", "CT"),
        ("2.2", "", "MR"),
    ]


# --------------------------------------------------------------------------- enhanced, mosaic


def enhanced_row(file_id: str, positions, **fields) -> dict:
    n = len(positions)
    return image_row(
        file_id,
        SOPClassUID=ENHANCED_MR,
        Modality="MR",
        IsEnhanced=True,
        NumberOfFrames=n,
        ImagePositionPatient=None,
        ImageOrientationPatient=None,
        PixelSpacing=None,
        FramePositions=[list(p) for p in positions],
        FrameOrientations=[list(AXIAL)] * n,
        FramePixelSpacing=[[0.5, 0.5]] * n,
        **fields,
    )


def test_enhanced_frames_form_a_stack_sorted_along_the_normal():
    positions = [(0.0, 0.0, z) for z in (8.0, 0.0, 4.0, 2.0, 6.0)]
    (scan,) = scans(run([enhanced_row("e", positions)]))
    assert [s.frame for s in scan.slices] == [1, 3, 2, 4, 0]
    assert scan.kind == "enhanced" and scan.files == ["e"]


def test_enhanced_file_with_two_stacks_is_in_both_scans():
    positions = [(0.0, 0.0, float(z)) for z in range(5)] * 2
    row = enhanced_row("e", positions, FrameStackID=["1"] * 5 + ["2"] * 5)
    result = run([row])
    assert len(scans(result)) == 2
    assert result.outcomes() == {"e": ("scan", scans(result)[0].name)}


def test_enhanced_4d_frames_split_by_temporal_index():
    positions = [(0.0, 0.0, float(z)) for z in range(5) for _ in range(2)]
    row = enhanced_row("e", positions, FrameTemporalPosition=[2, 1] * 5)
    volumes = sorted(scans(run([row])), key=lambda s: s.volume_index)
    assert [[s.frame for s in v.slices] for v in volumes] == [[1, 3, 5, 7, 9], [0, 2, 4, 6, 8]]


def test_enhanced_copy_of_classic_images_is_dropped():
    classic = series("c", 5, SOPClassUID=MR, Modality="MR")
    positions = [tuple(r["ImagePositionPatient"]) for r in classic]
    by_reference = enhanced_row(
        "e1", positions, SeriesNumber=5, ReferencedSOPInstanceUIDs=[classic[0]["SOPInstanceUID"]]
    )
    by_layout = enhanced_row("e2", positions, SeriesInstanceUID="1.1.7")
    result = run([*classic, by_reference, by_layout])
    assert [s.kind for s in scans(result)] == ["classic"]
    assert reasons(result) == {"e1": "duplicate_enhanced_copy", "e2": "duplicate_enhanced_copy"}


def test_mosaic_tiles_become_slices_along_the_slice_normal():
    row = image_row(
        "mosaic",
        SOPClassUID=MR,
        Modality="MR",
        Rows=12,
        Columns=12,
        IsMosaic=True,
        NumberOfImagesInMosaic=8,
        SliceNormalVector=[0.0, 0.0, 1.0],
        SpacingBetweenSlices=3.0,
        ImagePositionPatient=[-10.0, -10.0, 0.0],
    )
    (scan,) = scans(run([row]))
    assert scan.kind == "mosaic" and (scan.rows, scan.columns) == (4, 4)
    assert [s.tile for s in scan.slices] == list(range(8))
    # The mosaic IPP is the corner of a 12x12 image centred on the 4x4 tile: shift by 4 pixels.
    assert scan.slices[0].position == pytest.approx((-8.0, -8.0, 0.0))
    assert scan.slices[-1].position == pytest.approx((-8.0, -8.0, 21.0))


def test_mosaic_without_layout_is_missing_geometry():
    row = image_row("mosaic", IsMosaic=True, NumberOfImagesInMosaic=None, SliceNormalVector=None)
    assert reasons(run([row])) == {"mosaic": "missing_geometry"}


# --------------------------------------------------------------------------- invariants


def test_plan_does_not_depend_on_row_order():
    rows = [
        *series("a", 6),
        *series("b", 5, SeriesNumber=2),
        image_row("x", error="empty: zero"),
        *[
            image_row(f"f/{t}{i}", z=i, SeriesNumber=3, InstanceNumber=t * 9 + i)
            for t in range(2)
            for i in range(5)
        ],
    ]
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    assert run(rows) == run(shuffled)


_row_kinds = st.sampled_from(
    ["image", "image", "image", "sr", "sc", "error", "duplicate", "nogeometry", "tilted"]
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(_row_kinds, st.integers(0, 2), st.integers(0, 3), st.integers(0, 12), st.integers(0, 2)),
        max_size=60,
    ),
    st.integers(1, 6),
)
def test_every_file_ends_in_exactly_one_outcome(specs, min_slices):
    rows = []
    for i, (kind, study, series_number, z, echo) in enumerate(specs):
        fields = {
            "StudyInstanceUID": f"9.{study}",
            "SeriesInstanceUID": f"9.{study}.{series_number}",
            "SeriesNumber": series_number,
            "EchoNumbers": echo,
        }
        if kind == "sr":
            fields.update(SOPClassUID="1.2.840.10008.5.1.4.1.1.88.22", HasPixelData=False)
        elif kind == "sc":
            fields["SOPClassUID"] = "1.2.840.10008.5.1.4.1.1.7"
        elif kind == "error":
            fields["error"] = "truncated: cut"
        elif kind == "duplicate" and rows:
            fields["SOPInstanceUID"] = rows[-1]["SOPInstanceUID"]
        elif kind == "nogeometry":
            fields["ImageOrientationPatient"] = None
        elif kind == "tilted":
            fields["iop"] = (1.0, 0.0, 0.0, 0.0, 0.96, -0.28)
        rows.append(image_row(f"r/{i:03d}", z=float(z), **fields))
    result = run(rows, min_slices=min_slices)
    for scan in scans(result):
        normal = geometry.slice_normal(scan.image_orientation)
        offsets = [float(np.dot(s.position, normal)) for s in scan.slices]
        assert offsets == sorted(offsets) and len(scan.slices) >= min_slices


def test_every_reason_code_is_documented():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "ingest.md").read_text()
    assert [code for code in REASONS if f"| `{code}` |" not in docs] == []
