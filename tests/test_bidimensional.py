"""Bidimensional (RANO) measures of analytic shapes (bids_postop.core.bidimensional) on 1 mm, anisotropic
(0.5×0.5×5 mm), oblique and sagittal-stored grids: within one in-plane voxel of the analytic diameters of the
axial section measured."""

import numpy as np
import pytest

from bids_postop.core.bidimensional import axial_spacing, measure_bidimensional


def rotation(axis: str, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    return np.array({"x": [[1, 0, 0], [0, c, -s], [0, s, c]], "y": [[c, 0, s], [0, 1, 0], [-s, 0, c]],
                     "z": [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis], dtype=float)


def grid(spacing, shape, *, rot=None, axes=(0, 1, 2), offset=(0.3, -0.2, 0.1)) -> np.ndarray:
    """Affine whose voxel axis a runs along world axis ``axes[a]`` (then rotated by ``rot``) with voxel size
    ``spacing[a]`` (negative: flipped); the volume's centre lies at ``offset`` (RAS mm)."""
    rot = np.eye(3) if rot is None else rot
    m = np.zeros((3, 3))
    for a in range(3):
        m[:, a] = rot @ np.eye(3)[axes[a]] * spacing[a]
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = np.asarray(offset) - m @ ((np.array(shape) - 1) / 2)
    return affine


def world(shape, affine) -> np.ndarray:
    return np.indices(shape).reshape(3, -1).T @ affine[:3, :3].T + affine[:3, 3]


def ellipsoid(shape, affine, semi, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    return (((world(shape, affine) - centre) / np.asarray(semi)) ** 2).sum(1).reshape(shape) <= 1


def box(shape, affine, half, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    return (np.abs(world(shape, affine) - centre) <= np.asarray(half)).all(1).reshape(shape)


def analytic(kind, semi, z, centre_z=0.0):
    """Longest and perpendicular diameters (mm) of the axial section at height z of an RAS-aligned shape."""
    a, b = max(semi[:2]), min(semi[:2])
    if kind == "ellipsoid":
        f = np.sqrt(max(0.0, 1 - ((z - centre_z) / semi[2]) ** 2))
        return 2 * a * f, 2 * b * f
    longest = np.hypot(2 * a, 2 * b)  # a rectangle's longest diameter is its diagonal
    return longest, 2 * b * longest / (2 * a)  # the longest chord perpendicular to the diagonal


def in_plane_voxel(affine) -> float:
    """The largest source voxel size within the axial plane: 'one in-plane voxel'."""
    m = affine[:3, :3]
    sizes = np.linalg.norm(m, axis=0)
    s_axis = int(np.argmax(np.abs(m[2]) / sizes))
    return float(max(sizes[a] for a in range(3) if a != s_axis))


GRIDS = {
    "1mm": dict(spacing=(1, 1, 1), shape=(70, 70, 44)),
    "1mm_flipped_x": dict(spacing=(-1, 1, 1), shape=(70, 70, 44)),
    "aniso_0.5x0.5x5": dict(spacing=(0.5, 0.5, 5), shape=(140, 140, 12)),
    "oblique_tilt20_1mm": dict(spacing=(1, 1, 1), shape=(70, 70, 70), rot=rotation("x", 20)),
    "oblique_tilt20y_1mm": dict(spacing=(1, 1, 1), shape=(70, 70, 70), rot=rotation("y", 20)),
    "oblique_inplane20_aniso": dict(spacing=(0.5, 0.5, 5), shape=(150, 150, 12), rot=rotation("z", 20)),
    # sagittal acquisition: voxel axes run A, S, R (slices along R, 1 mm apart)
    "sagittal_0.5x0.5x1": dict(spacing=(0.5, 0.5, 1.0), shape=(130, 130, 60), axes=(1, 2, 0)),
}
SHAPES = [
    ("ellipsoid", (15.3, 8.2, 6.1)),
    ("ellipsoid", (9.6, 14.2, 8.3)),  # long axis along A
    ("box", (14.0, 9.0, 6.0)),
]


@pytest.mark.parametrize("offset", [(0.3, -0.2, 0.1), (-0.4, 0.35, 0.0)])
@pytest.mark.parametrize("kind, semi", SHAPES)
@pytest.mark.parametrize("name", GRIDS)
def test_single_shape_within_one_in_plane_voxel(name, kind, semi, offset):
    affine = grid(offset=offset, **GRIDS[name])
    shape = GRIDS[name]["shape"]
    mask = ellipsoid(shape, affine, semi) if kind == "ellipsoid" else box(shape, affine, semi)
    summary = measure_bidimensional(mask, affine)
    assert len(summary.components) == 1
    c = summary.components[0]
    tol = in_plane_voxel(affine) + 1e-9
    longest, perpendicular = analytic(kind, semi, c.slice_z_mm)
    assert abs(c.longest_mm - longest) <= tol, (c.longest_mm, longest)
    assert abs(c.perpendicular_mm - perpendicular) <= tol, (c.perpendicular_mm, perpendicular)
    assert c.product_mm2 == pytest.approx(c.longest_mm * c.perpendicular_mm)
    # the section measured is (one of) the largest: as long, within a voxel, as the sampled section nearest the centre
    dz = summary.axial_spacing_mm[2]
    assert longest >= analytic(kind, semi, c.slice_z_mm - round(c.slice_z_mm / dz) * dz)[0] - tol
    # end points: on the measured slice, at the stated distances, the two diameters perpendicular
    (p, q), (a, b) = np.array(c.longest_end_points), np.array(c.perpendicular_end_points)
    assert np.allclose([p[2], q[2], a[2], b[2]], c.slice_z_mm)
    assert np.linalg.norm(q - p) == pytest.approx(c.longest_mm)
    assert np.linalg.norm(b - a) == pytest.approx(c.perpendicular_mm)
    assert abs(np.dot(q - p, b - a)) <= 1e-9 * c.longest_mm * c.perpendicular_mm
    # ... and on the lesion: within one voxel of the analytic section
    f = np.sqrt(1 - (c.slice_z_mm / semi[2]) ** 2) if kind == "ellipsoid" else 1.0
    for point in (p, q, a, b):
        if kind == "ellipsoid":
            assert (((point[:2]) / (np.array(semi[:2]) * f + tol)) ** 2).sum() <= 1
        else:
            assert np.all(np.abs(point[:2]) <= np.array(semi[:2]) + tol)
    assert c.n_voxels == int(mask.sum())
    assert c.volume_ml == pytest.approx(mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000, abs=1e-6)
    assert c.measurable and summary.n_measurable == 1
    assert summary.sum_products_mm2 == pytest.approx(c.product_mm2)


# centre (RAS mm), semi-axes (mm); on a 1 mm grid with voxel centres at integer coordinates
LESIONS = [
    ((-35.0, -35.0, 0.0), (14.3, 9.2, 6.0)),
    ((0.0, -35.0, 0.0), (11.4, 8.3, 5.0)),
    ((35.0, -35.0, 0.0), (9.3, 7.4, 5.0)),
    ((-35.0, 10.0, 0.0), (8.4, 6.3, 5.0)),
    ((0.0, 10.0, 0.0), (7.4, 6.4, 4.0)),
    ((35.0, 10.0, 0.0), (6.4, 6.2, 4.0)),  # measurable (12.8 x 12.4 mm), the smallest measurable one
    ((0.0, 40.0, 0.0), (11.3, 3.6, 4.0)),  # 22.6 x 7.2 mm: not measurable
    ((35.0, 40.0, 0.0), (3.6, 3.1, 3.0)),  # 7.2 x 6.2 mm: not measurable
]


def test_several_components_sum_over_the_five_largest_measurable():
    affine = np.eye(4)
    affine[:3, 3] = (-60.0, -60.0, -20.0)
    shape = (121, 121, 41)
    mask = np.zeros(shape, bool)
    for centre, semi in LESIONS:
        mask |= ellipsoid(shape, affine, semi, centre)
    summary = measure_bidimensional(mask, affine)
    assert len(summary.components) == len(LESIONS)
    expected = {}
    for c in summary.components:
        mid = np.mean(c.longest_end_points, axis=0)
        centre, semi = min(LESIONS, key=lambda lesion: np.linalg.norm(np.subtract(lesion[0], mid)))
        longest, perpendicular = analytic("ellipsoid", semi, c.slice_z_mm, centre[2])
        assert abs(c.longest_mm - longest) <= 1.0 and abs(c.perpendicular_mm - perpendicular) <= 1.0
        assert c.measurable == (min(longest, perpendicular) >= 10.0)
        expected[c.index] = longest * perpendicular
    measurable = [c for c in summary.components if c.measurable]
    assert summary.n_measurable == len(measurable) == 6
    largest = sorted(measurable, key=lambda c: -c.product_mm2)[:5]
    assert summary.summed == tuple(c.index for c in largest)
    assert summary.sum_products_mm2 == pytest.approx(sum(c.product_mm2 for c in largest))
    analytic_sum = sum(sorted((expected[c.index] for c in measurable), reverse=True)[:5])
    assert abs(summary.sum_products_mm2 - analytic_sum) / analytic_sum < 0.1
    # RANO 2.0-style count: fewer lesions in the sum
    three = measure_bidimensional(mask, affine, max_lesions=3)
    assert three.summed == summary.summed[:3] and three.n_measurable == 6


@pytest.mark.parametrize("semi, measurable", [
    ((12.0, 4.0, 5.0), False),  # 24 x 8 mm: the perpendicular diameter is under 10 mm
    ((4.2, 3.8, 5.0), False),  # 8.4 x 7.6 mm
    ((6.6, 6.4, 5.0), True),  # 13.2 x 12.8 mm
])
def test_components_under_10_mm_are_not_measurable(semi, measurable):
    affine = grid((1, 1, 1), (40, 40, 20))
    summary = measure_bidimensional(ellipsoid((40, 40, 20), affine, semi), affine)
    assert summary.components[0].measurable is measurable
    assert summary.n_measurable == int(measurable)
    assert summary.sum_products_mm2 == (summary.components[0].product_mm2 if measurable else 0.0)


def test_a_lesion_on_one_axial_slice_is_not_measurable():
    mask = np.zeros((40, 40, 10), bool)
    mask[5:30, 8:28, 4] = True  # 25 x 20 mm, one 1 mm slice
    summary = measure_bidimensional(mask, np.eye(4))
    c = summary.components[0]
    assert c.n_axial_slices == 1 and c.longest_mm > 10 and c.perpendicular_mm > 10 and not c.measurable
    assert measure_bidimensional(mask, np.eye(4), min_axial_slices=1).components[0].measurable


def test_empty_mask_has_no_lesion():
    summary = measure_bidimensional(np.zeros((10, 10, 10), bool), np.eye(4))
    assert summary.components == () and summary.n_measurable == 0 and summary.sum_products_mm2 == 0.0
    assert summary.to_dict()["summed"] == ()


@pytest.mark.parametrize("spacing, rot, axes, expected", [
    ((1, 1, 1), np.eye(3), (0, 1, 2), (1.0, 1.0, 1.0)),
    ((0.5, 0.5, 5), np.eye(3), (0, 1, 2), (0.5, 0.5, 5.0)),
    ((-0.6, 0.5, 4), rotation("z", 20), (0, 1, 2), (0.5, 0.5, 4.0)),
    ((0.5, 0.5, 1.0), np.eye(3), (1, 2, 0), (0.5, 0.5, 0.5)),  # sagittal: S is sampled every 0.5 mm
    ((0.9, 0.9, 3.0), rotation("x", 20), (0, 1, 2), (0.9, 0.9, 3.0)),
])
def test_axial_spacing(spacing, rot, axes, expected):
    assert axial_spacing(grid(spacing, (10, 10, 10), rot=rot, axes=axes)) == pytest.approx(expected)
    assert axial_spacing(np.eye(4), in_plane_mm=0.25) == (0.25, 0.25, 1.0)


@pytest.mark.parametrize("mask, affine, kwargs", [
    (np.zeros((10, 10)), np.eye(4), {}),
    (np.zeros((10, 10, 10)), np.diag([1.0, 1.0, 0.0, 1.0]), {}),
    (np.zeros((10, 10, 10)), np.eye(3), {}),
    (np.zeros((10, 10, 10)), np.eye(4), {"max_lesions": 0}),
    (np.zeros((10, 10, 10)), np.eye(4), {"in_plane_mm": -1.0}),
])
def test_invalid_inputs_are_refused(mask, affine, kwargs):
    with pytest.raises(ValueError):
        measure_bidimensional(mask, affine, **kwargs)
