"""Build stage: geometry properties, intensity encoding and whole scans from synthetic DICOM."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pydicom.data import get_testdata_files
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid

from hlip.ingest import geometry, volume
from hlip.ingest.index import index_sources, open_source
from hlip.ingest.plan import PlanConfig, plan
from hlip.ingest.volume import ScanRejected, VolumeConfig, build_scan, encode_intensity

# --------------------------------------------------------------------------- helpers


def rotation(quaternion) -> np.ndarray:
    """Rotation matrix of a (not necessarily unit) quaternion."""
    w, x, y, z = np.asarray(quaternion, float) / np.linalg.norm(quaternion)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


quaternions = st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.2)
spacings = st.floats(0.3, 5.0)


def orthogonal_affine(quaternion, spacing, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(quaternion) * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def world_of_all_voxels(affine: np.ndarray, shape) -> np.ndarray:
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return index @ affine[:3, :3].T + affine[:3, 3]


# --------------------------------------------------------------------------- affines, orientation


@settings(max_examples=50, deadline=None)
@given(quaternions, spacings, spacings, st.lists(st.floats(-300, 300), min_size=6, max_size=6))
def test_stack_affine_places_every_pixel_like_dicom(q, ps_row, ps_col, numbers):
    matrix = rotation(q)
    iop = [*matrix[:, 0], *matrix[:, 1]]
    origin, step = np.array(numbers[:3]), np.array(numbers[3:]) / 100
    affine = geometry.stack_affine(iop, (ps_row, ps_col), origin, step)
    d, r, c = 3, 5, 7
    expected = origin + d * step + r * ps_row * matrix[:, 1] + c * ps_col * matrix[:, 0]
    assert affine @ [d, r, c, 1] == pytest.approx([*expected, 1])


@settings(max_examples=60, deadline=None)
@given(quaternions, st.tuples(spacings, spacings, spacings), st.tuples(*[st.integers(1, 5)] * 3))
def test_canonical_reorientation_keeps_every_voxel_in_place(q, spacing, shape):
    affine = orthogonal_affine(q, spacing, origin=(4.0, -2.0, 7.0))
    array = np.arange(np.prod(shape)).reshape(shape)
    perm, flips = geometry.canonical_transform(affine)
    new_array, new_affine = geometry.reorient(array, affine, perm, flips)
    assert perm[0] == 0  # the slice axis stays the slice axis
    old_world = world_of_all_voxels(affine, shape)
    new_world = world_of_all_voxels(new_affine, new_array.shape)
    np.testing.assert_allclose(new_world, old_world[new_array.reshape(-1)], atol=1e-9)
    directions = new_affine[:3, :3] / np.linalg.norm(new_affine[:3, :3], axis=0)
    assert (
        np.dot(directions[:, 0], np.cross(directions[:, 2], directions[:, 1])) > 0
    )  # right-handed (w, h, d)


@pytest.mark.parametrize(
    ("row", "col", "w_axis", "h_axis"),
    [
        ((1, 0, 0), (0, 1, 0), (1, 0, 0), (0, 1, 0)),  # axial, head first
        ((-1, 0, 0), (0, 1, 0), (1, 0, 0), (0, 1, 0)),  # axial, feet first
        ((0, 1, 0), (1, 0, 0), (1, 0, 0), (0, 1, 0)),  # axial, transposed
        ((1, 0, 0), (0, 0, -1), (1, 0, 0), (0, 0, -1)),  # coronal
        ((0, 1, 0), (0, 0, -1), (0, 1, 0), (0, 0, -1)),  # sagittal
        ((0, 0, 1), (0, -1, 0), (0, 1, 0), (0, 0, -1)),  # sagittal, rotated and flipped
    ],
)
def test_canonical_orientation_convention(row, col, w_axis, h_axis):
    affine = geometry.stack_affine([*row, *col], (1.0, 1.0), (0, 0, 0), np.cross(row, col) * 2.0)
    _, new_affine = geometry.reorient(np.zeros((2, 3, 4)), affine, *geometry.canonical_transform(affine))
    assert new_affine[:3, 2] == pytest.approx(w_axis)
    assert new_affine[:3, 1] == pytest.approx(h_axis)
    assert new_affine[:3, 0] == pytest.approx(np.cross(w_axis, h_axis) * 2.0)


# --------------------------------------------------------------------------- resampling


def linear_field(world: np.ndarray) -> np.ndarray:
    return world @ np.array([0.7, -1.3, 2.1]) + 5.0


@settings(max_examples=30, deadline=None)
@given(quaternions, st.tuples(spacings, spacings, spacings), st.tuples(spacings, spacings, spacings))
def test_resampling_reproduces_a_linear_field_on_the_exact_new_grid(q, spacing, target):
    affine = orthogonal_affine(q, spacing, origin=(1.0, 2.0, 3.0))
    shape = (6, 7, 5)
    volume = linear_field(world_of_all_voxels(affine, shape)).reshape(shape)
    out, new_affine = geometry.resample(volume, affine, target, antialias=False)
    assert geometry.affine_spacing(new_affine) == pytest.approx(target)
    # Same field of view, same centre.
    centre = lambda a, s: a @ [*(np.asarray(s) - 1) / 2, 1]  # noqa: E731
    assert centre(new_affine, out.shape) == pytest.approx(centre(affine, shape), abs=1e-6)
    # Inside the old grid, trilinear interpolation of a linear field is exact.
    world = world_of_all_voxels(new_affine, out.shape)
    index = (world - affine[:3, 3]) @ np.linalg.inv(affine[:3, :3]).T
    inside = np.all((index >= -1e-9) & (index <= np.array(shape) - 1 + 1e-9), axis=1)
    np.testing.assert_allclose(out.reshape(-1)[inside], linear_field(world[inside]), rtol=1e-4, atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.floats(0.5, 1.0), st.integers(0, 2**16))
def test_antialiased_downsampling_averages_instead_of_skipping(factor, spacing, seed):
    rng = np.random.default_rng(seed)
    affine = orthogonal_affine((1, 0, 0, 0), (spacing, 1.0, 1.0))
    noise = rng.normal(size=(60, 4, 4))
    constant, _ = geometry.resample(np.full((60, 4, 4), 7.0), affine, (factor * spacing, None, None))
    averaged, new_affine = geometry.resample(noise, affine, (factor * spacing, None, None))
    sampled, sampled_affine = geometry.resample(
        noise, affine, (factor * spacing, None, None), antialias=False
    )
    np.testing.assert_allclose(constant, 7.0, rtol=1e-6)
    assert np.array_equal(new_affine, sampled_affine) and averaged.shape == (60 // factor, 4, 4)
    assert averaged.std() < 0.85 * sampled.std()
    # With an integer factor, averaging is exact on a linear ramp away from the borders.
    ramp, _ = geometry.resample(
        np.arange(60.0)[:, None, None] * np.ones((1, 4, 4)), affine, (factor * spacing, None, None)
    )
    centres = (np.arange(60 // factor) * factor + (factor - 1) / 2)[1:-1]
    np.testing.assert_allclose(ramp[1:-1, 0, 0], centres, atol=1e-4)


def test_matching_spacing_is_left_bit_exact():
    affine = orthogonal_affine((1, 0, 0, 0), (3.0, 1.0, 1.0))
    volume = np.random.default_rng(0).integers(-1000, 1000, (4, 5, 6)).astype(np.float32)
    out, new_affine = geometry.resample(volume, affine, (3.0, None, 1.0))
    assert np.array_equal(out, volume) and np.array_equal(new_affine, affine)


def test_uneven_slices_are_placed_where_they_are():
    offsets = np.array([0.0, 1.0, 2.5, 3.0, 5.0])
    affine = geometry.stack_affine([1, 0, 0, 0, 1, 0], (1.0, 1.0), (0, 0, 0), (0, 0, 1.25))
    world_z = offsets[:, None, None] * np.ones((5, 3, 3))
    out, new_affine = geometry.resample(world_z, affine, (None, None, None), slice_offsets=offsets)
    assert out.shape == (5, 3, 3) and geometry.affine_spacing(new_affine)[0] == pytest.approx(1.25)
    expected_z = new_affine[2, 3] + np.arange(5) * 1.25
    np.testing.assert_allclose(out[:, 1, 1], expected_z, atol=1e-5)


def test_removing_gantry_tilt_reproduces_a_linear_field():
    tilt = np.deg2rad(20.0)
    iop = [1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt)]
    spacing = (0.5, 0.5)
    positions = np.array([[0.0, 0.0, 2.0 * k] for k in range(6)])
    volume = np.stack(
        [
            linear_field(world_of_all_voxels(geometry.stack_affine(iop, spacing, p, (0, 0, 1)), (1, 20, 8)))
            for p in positions
        ]
    ).reshape(6, 20, 8)
    out, affine = geometry.remove_shear(volume, positions, iop, spacing, fill=-1e6)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-9)
    assert geometry.affine_spacing(affine)[0] == pytest.approx(2.0 * np.cos(tilt))
    assert out.shape[1] == 20 + int(np.ceil(5 * 2.0 * np.sin(tilt) / 0.5 - 1e-6))
    inside = out.reshape(-1) > -1e5
    world = world_of_all_voxels(affine, out.shape)
    np.testing.assert_allclose(out.reshape(-1)[inside], linear_field(world[inside]), rtol=1e-5, atol=1e-3)
    # Each output slice holds its input slice (one row fewer where the shift is fractional).
    per_slice = inside.reshape(out.shape).sum(axis=(1, 2))
    assert set(per_slice.tolist()) <= {19 * 8, 20 * 8} and per_slice[0] == 20 * 8


# --------------------------------------------------------------------------- intensities


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.uint16, (3, 4, 4)),
    st.floats(0.01, 10),
    st.floats(-5000, 5000),
)
def test_uniform_rescale_is_stored_losslessly(stored, slope, intercept):
    encoded = encode_intensity(stored, [slope] * 3, [intercept] * 3, "MR")
    assert encoded.lossless and encoded.array.dtype == np.int16
    physical = encoded.array.astype(np.float64) * encoded.slope + encoded.intercept
    np.testing.assert_allclose(
        physical, stored * slope + intercept, rtol=1e-9, atol=1e-6 * (1 + abs(intercept))
    )


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.int32, (2, 3, 3), elements=st.integers(-(2**24), 2**24)), st.floats(0.1, 3), st.floats(0.1, 3)
)
def test_per_slice_rescale_is_quantised_within_half_a_step(stored, slope_a, slope_b):
    encoded = encode_intensity(stored, [slope_a, slope_b], [0.0, 1.5], "MR")
    physical = stored * np.array([slope_a, slope_b])[:, None, None] + np.array([0.0, 1.5])[:, None, None]
    error = np.abs(encoded.array * encoded.slope + encoded.intercept - physical)
    assert error.max() <= encoded.slope / 2 * (1 + 1e-6) + 1e-9


def test_ct_is_stored_in_hounsfield_units_clipped_to_int16():
    stored = np.array([[[0, 1024, 4095, 60000]]], dtype=np.uint16)
    encoded = encode_intensity(stored, [1.0], [-1024.0], "CT")
    assert encoded.array.tolist() == [[[-1024, 0, 3071, 32767]]]
    assert (encoded.slope, encoded.intercept, encoded.unit, encoded.lossless) == (1.0, 0.0, "HU", False)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from([np.uint8, np.int8, np.uint16, np.int16]).flatmap(lambda t: arrays(t, (3, 2, 5))),
    st.lists(st.integers(-3, 3), min_size=3, max_size=3),
    st.lists(st.integers(-40000, 40000), min_size=3, max_size=3),
)
def test_integral_ct_rescale_equals_wide_arithmetic(stored, slopes, intercepts):
    """CT with integral RescaleSlope/Intercept: whichever int16 path is taken, the HU are
    the exact values clipped to int16, and lossless says whether clipping was needed."""
    encoded = encode_intensity(stored, slopes, intercepts, "CT")
    exact = stored.astype(np.int64) * np.array(slopes)[:, None, None] + np.array(intercepts)[:, None, None]
    assert encoded.array.dtype == np.int16
    assert np.array_equal(encoded.array, np.clip(exact, -32768, 32767))
    assert encoded.lossless == bool(exact.min() >= -32768 and exact.max() <= 32767)


def test_integer_physical_values_from_per_slice_rescale_stay_exact():
    stored = np.array([[[1, 2]], [[3, 4]]], dtype=np.int16)
    encoded = encode_intensity(stored, [2.0, 3.0], [1.0, -1.0], "PT")
    assert encoded.lossless and encoded.array.tolist() == [[[3, 5]], [[8, 11]]] and encoded.slope == 1.0


# --------------------------------------------------------------------------- whole scans


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    iop=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    origin=(-10.0, -20.0, 30.0),
    step=(0.0, 0.0, 2.5),
    spacing=(0.5, 0.75),
    modality="CT",
    rescale=(1.0, -1024.0),
    offsets=None,
    compressed_garbage=False,
) -> None:
    """One classic DICOM file per slice, written in shuffled order with reversed InstanceNumber."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    order = list(range(len(volume)))
    random.Random(0).shuffle(order)
    for k in order:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless if compressed_garbage else ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 7, len(volume) - k
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        offset = k if offsets is None else offsets[k]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + offset * np.asarray(step)]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelSpacing = list(spacing)
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        if compressed_garbage:
            ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
        else:
            ds.PixelData = volume[k].astype(np.uint16).tobytes()
        ds.save_as(folder / f"{k * 7919 % 1000:03d}", enforce_file_format=True)


def build_all(folder: Path, config: VolumeConfig, **plan_config):
    table = index_sources(folder)
    result = plan(table, PlanConfig(**plan_config))
    rows = {r["file_id"]: r for r in table.to_pylist()}
    return [build_scan(scan, rows, config) for study in result.studies for scan in study.scans], result


def source_index_of(scan, origin, step, iop, spacing) -> np.ndarray:
    """For every voxel of ``scan``, the (slice, row, col) of the source image it came from."""
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    basis = np.stack([np.asarray(step, float), col * spacing[0], row * spacing[1]], axis=1)
    world = world_of_all_voxels(scan.affine, scan.shape)
    return (world - np.asarray(origin)) @ np.linalg.inv(basis).T


@pytest.mark.parametrize(
    ("iop", "step"),
    [
        ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, 2.5)),  # axial, head first
        ((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, -2.5)),  # axial, feet first
        ((0.0, 1.0, 0.0, 0.0, 0.0, -1.0), (-2.5, 0.0, 0.0)),  # sagittal
    ],
)
def test_native_scan_puts_every_voxel_where_its_pixel_was(tmp_path, iop, step):
    source = np.random.default_rng(1).integers(0, 4000, (6, 5, 4)).astype(np.uint16)
    write_series(tmp_path, source, iop=iop, step=step)
    (scan,), _ = build_all(tmp_path, VolumeConfig.native())
    assert scan.array.dtype == np.int16 and scan.intensity_unit == "HU"
    assert scan.source_file_count == 6 and scan.series_number == 7
    index = source_index_of(scan, (-10.0, -20.0, 30.0), step, iop, (0.5, 0.75))
    np.testing.assert_allclose(index, np.round(index), atol=1e-9)
    k, r, c = np.round(index).astype(int).T
    np.testing.assert_array_equal(scan.array.reshape(-1), source[k, r, c].astype(np.int32) - 1024)
    assert sorted(scan.spacing) == pytest.approx(sorted((2.5, 0.5, 0.75)))
    assert scan.spacing[0] == pytest.approx(2.5)


def test_mr_values_beyond_int16_are_shifted_losslessly(tmp_path):
    source = np.array([40000, 65535, 30000, 50000] * 15, dtype=np.uint16).reshape(5, 3, 4)
    write_series(tmp_path, source, modality="MR", rescale=(2.0, 10.0))
    (scan,), _ = build_all(tmp_path, VolumeConfig.native())
    assert scan.extra["lossless_intensity"] and scan.intensity_slope == 2.0
    physical = scan.array.astype(np.float64) * scan.intensity_slope + scan.intensity_intercept
    assert sorted(np.unique(physical)) == sorted(np.unique(source * 2.0 + 10.0))


def test_default_config_resamples_ct_to_3x1x1(tmp_path):
    source = np.full((8, 10, 12), 1024, dtype=np.uint16)
    write_series(tmp_path, source, step=(0.0, 0.0, 1.5))
    (scan,), _ = build_all(tmp_path, VolumeConfig())
    assert scan.spacing == pytest.approx((3.0, 1.0, 1.0))
    assert scan.shape == (4, 5, 9)
    assert np.all(scan.array == 0) and scan.extra["resampled"]


def test_uneven_spacing_needs_a_target_spacing(tmp_path):
    offsets = [0.0, 1.0, 2.0, 3.4, 4.0, 5.0]
    write_series(tmp_path, np.ones((6, 4, 4), dtype=np.uint16), offsets=offsets)
    with pytest.raises(ScanRejected) as refused:
        build_all(tmp_path, VolumeConfig.native())
    assert refused.value.reason == "uneven_spacing"
    (scan,), _ = build_all(tmp_path, VolumeConfig(target_spacing={"CT": (None, 0.5, 0.75)}))
    assert scan.shape == (6, 4, 4) and scan.spacing == pytest.approx((2.5, 0.5, 0.75))  # mean step


def test_two_spacing_regimes_are_equalized_to_the_smallest_step_in_native_mode(tmp_path):
    """GE sequential head CT: 4 mm slices, then 7 mm ones. A field linear along z is
    rebuilt exactly on the equalized grid, which covers the same extent."""
    offsets = np.concatenate([[0.0], np.cumsum([4.0] * 6 + [7.0] * 5)])
    source = (100 + 10 * offsets[:, None, None] * np.ones((1, 4, 4))).astype(np.uint16)
    write_series(tmp_path, source, offsets=offsets, step=(0.0, 0.0, 1.0), rescale=(1.0, 0.0))
    (native,), _ = build_all(tmp_path, VolumeConfig.native(), min_slices=3)
    assert native.extra["spacing_rule"] == "regimes" and native.extra["resampled"]
    assert native.spacing[0] == pytest.approx(4.0, rel=0.02)
    assert native.shape[0] == round(len(offsets) * (offsets[-1] / (len(offsets) - 1)) / 4.0)
    offset = world_of_all_voxels(native.affine, native.shape)[:, 2] - 30.0  # the series starts at z = 30
    inside = (offset >= 0) & (offset <= offsets[-1])
    values = np.asarray(native.array).reshape(-1)
    assert (
        inside.mean() > 0.8
    )  # the grid is centred on the same field of view: its end samples lie half a step out
    np.testing.assert_allclose(values[inside], 100 + 10 * offset[inside], atol=1.0)
    (resampled,), _ = build_all(tmp_path, VolumeConfig(), min_slices=3)
    assert resampled.spacing[0] == pytest.approx(3.0) and resampled.extra["spacing_rule"] == "regimes"


def test_tilted_ct_is_built_on_an_orthogonal_grid(tmp_path):
    tilt = np.deg2rad(12.0)
    iop = (1.0, 0.0, 0.0, 0.0, np.cos(tilt), -np.sin(tilt))
    write_series(tmp_path, np.full((6, 8, 8), 1100, dtype=np.uint16), iop=iop, step=(0.0, 0.0, 3.0))
    (scan,), _ = build_all(tmp_path, VolumeConfig.native())
    directions = scan.affine[:3, :3] / np.linalg.norm(scan.affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-9)
    assert scan.extra["tilt_corrected"] and scan.shape[1] > 8
    assert set(np.unique(scan.array)) <= {76}  # 1100 - 1024 everywhere; fill is the minimum


def test_undecodable_pixels_raise_scan_rejected(tmp_path):
    write_series(tmp_path, np.ones((5, 4, 4), dtype=np.uint16), compressed_garbage=True)
    with pytest.raises(ScanRejected) as refused:
        build_all(tmp_path, VolumeConfig.native())
    assert refused.value.reason == "decode_error"


def test_oversized_scans_are_refused_before_decoding(tmp_path):
    write_series(tmp_path, np.ones((5, 4, 4), dtype=np.uint16))
    with pytest.raises(ScanRejected) as refused:
        build_all(tmp_path, VolumeConfig.native(max_voxels=10))
    assert refused.value.reason == "too_large"


def test_rows_missing_from_the_mapping_are_a_rejection(tmp_path):
    write_series(tmp_path, np.ones((5, 4, 4), dtype=np.uint16))
    result = plan(index_sources(tmp_path), PlanConfig())
    with pytest.raises(ScanRejected):
        build_scan(result.studies[0].scans[0], {}, VolumeConfig.native())


# --------------------------------------------------------------------------- native pixel reads


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def test_native_pixels_read_at_the_indexed_offset_equal_pydicom():
    """The build reads native pixel data at the offset the index recorded; the values must
    be pydicom's (dtype, frames, unused high bits masked or sign-extended)."""
    if not SHARED.is_dir():
        raise FileNotFoundError(f"shared test data missing: {SHARED}")
    sources = [SHARED / "dicom2nifti", SHARED / "pydicom_data", SHARED / "dcm_qa_ts"]
    sources += [Path(p) for p in get_testdata_files() if p.endswith(".dcm")]
    table = index_sources(sources)
    compared = 0
    for row in table.filter(pc.is_valid(table.column("PixelDataOffset"))).to_pylist():
        if volume._native_dtype(row) is None:
            continue
        with open_source(row["path"], row["member"]) as fp:
            fast = volume._read_all(fp, row)
            try:
                reference = volume._read_pixels(fp, row["TransferSyntaxUID"])
            except Exception:
                continue  # pydicom refuses the file as a whole; so does the plan
        reference = reference.reshape(fast.shape)
        assert fast.dtype == reference.dtype and np.array_equal(fast, reference), row["file_id"]
        compared += 1
    assert compared > 100
