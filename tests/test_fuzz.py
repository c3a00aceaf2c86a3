"""Fuzzing (hypothesis) of the code that reads what users give us: image headers and affines, the
post-processing of probabilities, and the discovery of BIDS trees.

The property everywhere: the code either accepts the input or raises the documented
:class:`~bids_postop.errors.InputDataError` (discovery: also :class:`~bids_postop.errors.UsageError`) — any
other exception would reach the user as a traceback instead of a message naming the file and exit code 66.

NIfTI files are written byte by byte (a header whose fields are set directly, then the voxel bytes), so the
headers can be as broken as the ones found in the wild: zero, singular, NaN, huge, oblique or negative
affines and pixdims, any sform/qform code, quaternions out of range, NaN/Inf scaling, data types from uint8
to complex and RGB, 1-voxel axes, 4-D and 5-D shapes, truncated data.

Library bugs this fuzzing found are kept as regression tests at the end, each with its minimal example.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from bids_postop.bids.inputs import discover
from bids_postop.core.masks import load_binary_mask
from bids_postop.core.postprocess import postprocess_probability
from bids_postop.errors import InputDataError, UsageError
from bids_postop.workflows.preflight import MIN_AXIS_VOXELS, check_image, load_3d

# CI: a fixed, modest number of examples (derandomized: the same inputs every run, ~15 s in all). A longer
# hunt by hand: BIDS_POSTOP_FUZZ_EXAMPLES=3000 python -m pytest tests/test_fuzz.py (random inputs then).
LONG_HUNT = int(os.environ.get("BIDS_POSTOP_FUZZ_EXAMPLES", "0"))
_HEALTH = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
FUZZ = settings(deadline=None, max_examples=LONG_HUNT or 150, derandomize=not LONG_HUNT, database=None,
                suppress_health_check=_HEALTH)
FUZZ_DISCOVER = settings(deadline=None, max_examples=LONG_HUNT // 10 or 25, derandomize=not LONG_HUNT,
                         database=None, suppress_health_check=_HEALTH)

# NIfTI datatype codes → numpy dtypes written for them. 128 (RGB24) and 2304 (RGBA32) have their own test below.
DTYPE_CODES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 32: np.complex64,
               256: np.int8, 512: np.uint16, 768: np.uint32, 1024: np.int64, 1280: np.uint64, 1792: np.complex128,
               1: np.uint8}  # 1 = DT_BINARY (bool), written as bytes: nibabel must refuse or read it
RGB_DTYPE_CODES = {128: [("R", "u1"), ("G", "u1"), ("B", "u1")],
                         2304: [("R", "u1"), ("G", "u1"), ("B", "u1"), ("A", "u1")]}
SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, -1e30, 3.4e38, np.nan, np.inf, -np.inf]


# --- writing arbitrary NIfTI files ---------------------------------------------------------------------------

def write_raw_nifti(path: Path, data: np.ndarray, header_fields: dict, *, datatype: int | None = None,
                    truncate: bool = False) -> Path:
    """Write a single-file NIfTI-1 from a header whose fields are set directly (no consistency checks)."""
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    if datatype is None:
        header.set_data_dtype(data.dtype)
    else:
        header["datatype"] = datatype
        header["bitpix"] = 8 * data.dtype.itemsize
    header["vox_offset"] = 352
    for key, value in header_fields.items():
        header[key] = value
    voxels = np.asfortranarray(data).tobytes(order="F")
    if truncate:
        voxels = voxels[: len(voxels) // 2]
    raw = header.binaryblock + b"\0" * 4 + voxels
    path.write_bytes(gzip.compress(raw, compresslevel=1) if path.name.endswith(".gz") else raw)
    return path


finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)
special = st.sampled_from(SPECIAL_FLOATS)
any_float = st.one_of(finite, special)


@st.composite
def affines(draw) -> np.ndarray:
    kind = draw(st.sampled_from(["diag", "oblique", "zeros", "singular", "nan", "huge", "tiny", "random"]))
    zooms = np.array(draw(st.lists(st.one_of(st.floats(0.1, 8), st.floats(-8, -0.1), special), min_size=3,
                                   max_size=3)))
    aff = np.eye(4)
    if kind == "diag":
        aff[:3, :3] = np.diag(zooms)
    elif kind == "oblique":
        angles = draw(st.lists(st.floats(-np.pi, np.pi), min_size=3, max_size=3))
        rot = np.eye(3)
        for axis, angle in enumerate(angles):
            c, s = np.cos(angle), np.sin(angle)
            i, j = [a for a in range(3) if a != axis]
            r = np.eye(3)
            r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
            rot = rot @ r
        with np.errstate(all="ignore"):  # zooms may be NaN or infinite
            aff[:3, :3] = rot @ np.diag(zooms)
    elif kind == "zeros":
        aff[:3, :3] = 0
    elif kind == "singular":
        aff[:3, :3] = np.diag(zooms)
        aff[:3, 2] = aff[:3, 0]
    elif kind == "nan":
        aff[:3, :3] = np.diag(zooms)
        aff[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    elif kind == "huge":
        aff[:3, :3] = np.diag([1e30, -1e30, 3e38])
    elif kind == "tiny":
        aff[:3, :3] = np.diag([1e-8, 1e-6, 1e-5])
    else:
        aff[:3, :3] = np.array(draw(st.lists(any_float, min_size=9, max_size=9))).reshape(3, 3)
    aff[:3, 3] = draw(st.lists(any_float, min_size=3, max_size=3))
    return aff


@st.composite
def broken_header_fields(draw) -> dict:
    aff = draw(affines())
    fields = {
        "sform_code": draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255])),
        "qform_code": draw(st.sampled_from([0, 1, 2, 3, 4, 5, 255])),
        "srow_x": aff[0], "srow_y": aff[1], "srow_z": aff[2],
        "quatern_b": draw(st.one_of(st.floats(-1, 1), special)),
        "quatern_c": draw(st.one_of(st.floats(-1, 1), special)),
        "quatern_d": draw(st.one_of(st.floats(-1, 1), special)),
        "qoffset_x": draw(any_float), "qoffset_y": draw(any_float), "qoffset_z": draw(any_float),
        "scl_slope": draw(st.sampled_from([0.0, 1.0, 2.5, -1.0, 1e30, np.nan, np.inf])),
        "scl_inter": draw(st.sampled_from([0.0, 10.0, -5.0, np.nan, np.inf])),
    }
    fields["pixdim"] = [draw(st.sampled_from([-1.0, 1.0, 0.0]))] + draw(st.lists(
        st.one_of(st.floats(0.05, 10), st.floats(-10, -0.05), special), min_size=7, max_size=7))
    return fields


@st.composite
def sane_header_fields(draw) -> dict:
    """Headers as scanners write them (sform or qform, oblique or not, negative zooms), so that the fuzzing
    also reaches the code after the header checks."""
    zooms = draw(st.lists(st.one_of(st.floats(0.2, 8), st.floats(-8, -0.2)), min_size=3, max_size=3))
    aff = np.eye(4)
    aff[:3, :3] = np.diag(zooms)
    if draw(st.booleans()):
        angle = draw(st.floats(-0.5, 0.5))
        c, s = np.cos(angle), np.sin(angle)
        aff[:3, :3] = np.array([[1, 0, 0], [0, c, -s], [0, s, c]]) @ aff[:3, :3]
    aff[:3, 3] = draw(st.lists(finite, min_size=3, max_size=3))
    use_sform = draw(st.booleans())
    return {"sform_code": draw(st.sampled_from([1, 2, 4])) if use_sform else 0,
            "qform_code": 0 if use_sform else 1, "srow_x": aff[0], "srow_y": aff[1], "srow_z": aff[2],
            "pixdim": [draw(st.sampled_from([-1.0, 1.0])), *np.abs(zooms), 1, 0, 0, 0],
            "scl_slope": draw(st.sampled_from([0.0, 1.0, 0.5])), "scl_inter": 0.0}


header_fields = st.one_of(sane_header_fields(), broken_header_fields())


# Shapes: 3 to 5 axes, 0- and 1-voxel axes included, around the 8-voxel minimum.
shapes = st.one_of(st.lists(st.sampled_from([8, 9, 11]), min_size=3, max_size=3),
                   st.lists(st.sampled_from([0, 1, 2, 7, 8, 9, 11]), min_size=3, max_size=5)).map(tuple)


@st.composite
def voxel_arrays(draw, shape) -> tuple[np.ndarray, int]:
    code = draw(st.sampled_from(sorted(DTYPE_CODES)))
    dtype = np.dtype(DTYPE_CODES[code])
    n = int(np.prod(shape))
    fill = draw(st.sampled_from(["random", "constant", "binary", "special", "labels"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if fill == "constant":
        values = np.full(n, draw(finite))
    elif fill == "binary":
        values = (rng.random(n) > 0.7).astype(float)
    elif fill == "labels":
        values = rng.choice([0, 1, 2, 4], size=n).astype(float)
    else:
        values = rng.normal(0, 100, n)
        if fill == "special" and n:
            idx = rng.integers(0, n, size=max(1, n // 20))
            values[idx] = rng.choice(SPECIAL_FLOATS, size=idx.size)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(np.nan_to_num(values, nan=0, posinf=info.max, neginf=info.min), info.min, info.max)
        with np.errstate(all="ignore"):  # float64 rounding of the 64-bit limits
            data = values.astype(dtype)
    else:
        with np.errstate(all="ignore"):
            data = values.astype(dtype)
        if np.issubdtype(dtype, np.complexfloating):
            data = data + 1j * rng.normal(size=n).astype(dtype)
    return data.reshape(shape), code


@st.composite
def nifti_files(draw, directory: Path) -> Path:
    shape = draw(shapes)
    data, code = draw(voxel_arrays(shape))
    fields = draw(header_fields)
    name = f"img_{draw(st.integers(0, 10**9))}.nii{'.gz' if draw(st.booleans()) else ''}"
    truncate = draw(st.integers(0, 19)) == 0
    return write_raw_nifti(directory / name, data, fields, datatype=code, truncate=truncate)


def accepts_or_input_error(func, *args, **kwargs):
    """Call and return the result, or ``None`` after an :class:`InputDataError`; anything else propagates."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return func(*args, **kwargs) or True
        except InputDataError as exc:
            assert str(exc), "an empty message helps nobody"
            return None


@pytest.fixture(scope="module")
def scratch():
    folder = Path(tempfile.mkdtemp(prefix="bids_postop_fuzz_"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@FUZZ
@given(data=st.data())
def test_image_checks_accept_or_raise_input_data_error(scratch, data):
    path = data.draw(nifti_files(scratch))
    try:
        img = accepts_or_input_error(load_3d, path, what="fuzzed image")
        if img is not None:
            assert len(img.shape) == 3
            assert np.all(np.isfinite(img.affine))
        if accepts_or_input_error(check_image, path, what="fuzzed image") is not None:
            assert img is not None, "check_image accepted what load_3d refused"
            assert min(img.shape) >= MIN_AXIS_VOXELS
        mask = accepts_or_input_error(load_binary_mask, path, what="fuzzed mask")
        event(f"load_3d {'accepted' if img is not None else 'refused'}, mask {'accepted' if mask else 'refused'}")
        if mask is not None:
            values = np.asanyarray(mask.dataobj)
            assert mask.shape == img.shape and values.dtype == np.uint8
            assert set(np.unique(values)) <= {0, 1} and values.any()
    finally:
        path.unlink()


# --- post-processing -----------------------------------------------------------------------------------------

@FUZZ
@given(shape=st.lists(st.integers(1, 14), min_size=3, max_size=3).map(tuple),
       dtype=st.sampled_from([np.float32, np.float64]),
       layout=st.sampled_from(["C", "F", "strided"]),
       seed=st.integers(0, 2**16), sparsity=st.floats(0, 1), with_nan=st.booleans(),
       spacing=st.lists(st.floats(1e-3, 20), min_size=3, max_size=3).map(tuple),
       threshold=st.floats(1e-6, 1 - 1e-6), min_voxels=st.integers(0, 40),
       cutoff=st.floats(0, 10), inclusive=st.booleans(),
       preop=st.one_of(st.none(), st.floats(0, 500)))
def test_postprocess_never_raises_for_valid_thresholds(shape, dtype, layout, seed, sparsity, with_nan, spacing,
                                                       threshold, min_voxels, cutoff, inclusive, preop):
    rng = np.random.default_rng(seed)
    prob = (rng.random(shape) * (rng.random(shape) < sparsity)).astype(dtype)
    if with_nan:
        prob.flat[rng.integers(0, prob.size)] = np.nan
    if layout == "F":
        prob = np.asfortranarray(prob)
    elif layout == "strided":
        prob = np.repeat(prob, 2, axis=0)[::2]
    mask, m = postprocess_probability(prob, spacing, threshold=threshold, min_component_voxels=min_voxels,
                                      cutoff_ml=cutoff, gtr_inclusive=inclusive, preop_volume_ml=preop)
    assert mask.shape == prob.shape and mask.dtype == np.uint8
    above = prob >= threshold
    assert not np.any(mask.astype(bool) & ~above), "only voxels above the threshold are kept"
    assert m.voxels_above_threshold == int(above.sum()) and m.residual_voxels == int(mask.sum())
    assert m.components_removed >= 0
    # volumes are rounded to 1e-6 ml before the cut-off (core.postprocess.VOLUME_DECIMALS)
    assert m.residual_volume_ml == pytest.approx(mask.sum() * float(np.prod(spacing)) / 1000, abs=5.01e-7)
    assert m.resection_status == ("GTR" if (m.residual_volume_ml <= cutoff if inclusive
                                            else m.residual_volume_ml < cutoff) else "RT")
    if min_voxels > 1 and mask.any():
        import cc3d

        _, n = cc3d.connected_components(mask, connectivity=26, return_N=True)
        sizes = np.bincount(cc3d.connected_components(mask, connectivity=26).ravel())[1:]
        assert n >= 1 and sizes.min() >= min_voxels
    if preop is None or preop <= 0:
        assert m.eor_percent is None
    else:
        assert m.eor_percent == pytest.approx(100 * (preop - m.residual_volume_ml) / preop)


# --- discovery -----------------------------------------------------------------------------------------------

label = st.text("abcXYZ019", min_size=1, max_size=4)
weird_label = st.one_of(label, st.text("aé_-.+ 0", min_size=0, max_size=4))


@st.composite
def file_names(draw, sub: str, ses: str | None) -> str:
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses is not None else [])
    for key in draw(st.lists(st.sampled_from(["acq", "ce", "rec", "run", "desc", "label", "echo"]), max_size=3,
                             unique=True)):
        parts.append(f"{key}-{draw(st.one_of(label, st.sampled_from(['1', '02', '007', 'x1'])))}")
    suffix = draw(st.sampled_from(["T1w", "FLAIR", "T2w", "mask", "bold", "T1w_T1w", ""]))
    ext = draw(st.sampled_from([".nii.gz", ".nii", ".json", ".txt", ".nii.gz.bak", ""]))
    name = "_".join(parts + ([suffix] if suffix else [])) + ext
    if draw(st.integers(0, 5)) == 0:  # sometimes nothing BIDS-like at all
        name = draw(st.text("abc_-.1é ", min_size=1, max_size=12)) + draw(st.sampled_from([".nii.gz", ""]))
    return name


# participants.tsv contents, including rows with missing or extra cells and a byte-order mark
participants_tsv = st.one_of(
    st.none(),
    st.sampled_from(["\ufeffparticipant_id\tsite\nsub-01\tnorth\n", "participant_id\tsite\nsub-01\tnorth\t\n",
                     "site\tparticipant_id\nnorth\n"]),
    st.lists(st.tuples(st.text("0123abc-", max_size=5), st.text("naorth/ ", max_size=6)), max_size=4).map(
        lambda rows: "participant_id\tsite\n" + "".join(f"sub-{a}\t{b}\n" for a, b in rows)),
    st.sampled_from(["", "participant_id\n", "participant_id\tinstitution\nsub-01\n", "garbage"]),
)


@st.composite
def bids_trees(draw, root: Path) -> tuple[Path, list[str]]:
    root.mkdir(parents=True)
    description = draw(st.sampled_from(["ok", "ok", "ok", "missing", "not json", "list", "no version"]))
    if description != "missing":
        (root / "dataset_description.json").write_text({
            "ok": json.dumps({"Name": "fuzz", "BIDSVersion": "1.10.0"}), "not json": "{Name: fuzz",
            "list": "[]", "no version": json.dumps({"Name": "fuzz"})}[description])
    tsv = draw(participants_tsv)
    if tsv is not None:
        (root / "participants.tsv").write_text(tsv, encoding="utf-8")
    subjects = draw(st.lists(weird_label, max_size=3, unique=True))
    for sub in subjects:
        sessions = draw(st.lists(st.one_of(st.none(), st.sampled_from(["postop", "preop"]), label), min_size=1,
                                 max_size=2, unique=True))
        for ses in sessions:
            folder = root / f"sub-{sub}" / (f"ses-{ses}" if ses is not None else "") / draw(
                st.sampled_from(["anat", "anat", "func", "ANAT"]))
            for _ in range(draw(st.integers(0, 4))):
                name = draw(file_names(sub, ses))
                if not name.strip(". ") or "/" in name:
                    continue
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(b"\0" * draw(st.sampled_from([0, 10])))
    wanted = draw(st.lists(st.one_of(st.sampled_from(subjects) if subjects else label, weird_label,
                                     st.just("sub-01")), max_size=2))
    return root, wanted


@FUZZ_DISCOVER
@given(data=st.data(), validate=st.booleans(),
       sessions=st.sampled_from([("postop", "preop"), ("preop", "postop"), ("x", "x")]))
def test_discover_raises_only_documented_errors(scratch, data, validate, sessions):
    root = scratch / f"bids_{data.draw(st.integers(0, 10**9))}"
    assume(not root.exists())
    try:
        root, wanted = data.draw(bids_trees(root))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                found = discover(root, participant_labels=wanted, postop_session=sessions[0],
                                 preop_session=sessions[1], validate=validate)
            except (InputDataError, UsageError) as exc:
                assert str(exc)
                return
        for participant in found:
            for role, path in participant.files.items():
                assert path.is_file() and root.resolve() in path.resolve().parents, (role, path)
                assert path.name.endswith((".nii", ".nii.gz"))
            if "postop_t1ce" in participant.files:
                assert "_ce-" in participant.files["postop_t1ce"].name
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- regressions: bugs this fuzzing found, each with its minimal example (fixed) -------------------------

def _plain(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))
    return path


def test_zero_length_axis_mask_is_refused_not_crashed(tmp_path):
    path = _plain(tmp_path / "mask.nii.gz", np.zeros((9, 0, 9), np.uint8))
    with pytest.raises(InputDataError):
        load_binary_mask(path, what="mask")


def test_rgb_image_is_refused_not_crashed(tmp_path):
    rgb = np.zeros((9, 9, 9), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    path = _plain(tmp_path / "rgb.nii.gz", rgb)
    with pytest.raises(InputDataError):
        check_image(path, what="image")
    with pytest.raises(InputDataError):
        load_binary_mask(path, what="mask")


def test_complex_image_is_refused(tmp_path):
    data = (np.random.default_rng(0).normal(size=(9, 9, 9)) + 1j).astype(np.complex64)
    data[0, 0, 0] = np.nan
    path = _plain(tmp_path / "complex.nii.gz", data)
    with pytest.raises(InputDataError):
        load_3d(path, what="image")


def test_truncated_4d_singleton_is_refused_not_crashed(tmp_path):
    path = _plain(tmp_path / "single.nii", np.zeros((9, 9, 9, 1), np.float32))
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(InputDataError):
        load_3d(path, what="image")


def test_postprocess_with_a_1_voxel_axis():
    prob = np.array([0.9, 0.0, 0.9], np.float32).reshape(1, 1, 3)
    mask, measures = postprocess_probability(prob, (1.0, 1.0, 1.0), threshold=0.5, min_component_voxels=0)
    assert mask.ravel().tolist() == [1, 0, 1] and measures.components_removed == 0


def _one_participant_tree(root: Path, tsv: bytes) -> Path:
    anat = root / "sub-01" / "anat"
    anat.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "x", "BIDSVersion": "1.10.0"}))
    _plain(anat / "sub-01_ce-gd_T1w.nii.gz", np.zeros((2, 2, 2), np.float32))
    (root / "participants.tsv").write_bytes(tsv)
    return root


def test_participants_tsv_not_utf8(tmp_path):
    root = _one_participant_tree(tmp_path / "bids", "participant_id\tsite\nsub-01\tH\xf4pital\n".encode("latin-1"))
    try:
        [p] = discover(root, validate=False)
    except InputDataError:
        return
    assert p.site is not None


def test_participants_tsv_missing_participant_id(tmp_path):
    root = _one_participant_tree(tmp_path / "bids", b"site\tparticipant_id\nnorth\nsouth\tsub-01\n")
    [p] = discover(root, validate=False)
    assert p.site == "south"


def test_participants_tsv_extra_cell(tmp_path):
    root = _one_participant_tree(tmp_path / "bids", b"participant_id\tsite\nsub-01\tnorth\t\n")
    [p] = discover(root, validate=False)
    assert p.site == "north"


def test_participants_tsv_with_bom_keeps_sites(tmp_path):
    root = _one_participant_tree(tmp_path / "bids", "\ufeffparticipant_id\tsite\nsub-01\tnorth\n".encode())
    [p] = discover(root, validate=False)
    assert p.site == "north"


def test_fuzz_helpers_write_readable_files(tmp_path):
    """The byte-level writer itself produces what nibabel reads back (so the fuzzing tests real headers)."""
    data = np.arange(9 * 8 * 10, dtype=np.int16).reshape(9, 8, 10)
    path = write_raw_nifti(tmp_path / "x.nii.gz", data, {"sform_code": 1, "srow_x": [2, 0, 0, 1],
                                                         "srow_y": [0, 3, 0, 2], "srow_z": [0, 0, 4, 3]})
    img = nib.load(path)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])
    check_image(path, what="image")
