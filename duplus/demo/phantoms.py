"""Geometric building blocks of the synthetic phantoms: voxel grids in patient space, smooth blobs, fields.

Shapes are defined in millimetres in LPS patient coordinates, so any spacing or orientation samples the same anatomy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

# Direction cosines (row-major 3x3) of the orientations the demo scanners write.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "LPS": (1, 0, 0, 0, 1, 0, 0, 0, 1),
    "RAS": (-1, 0, 0, 0, -1, 0, 0, 0, 1),
    "LPI": (1, 0, 0, 0, 1, 0, 0, 0, -1),
    "RPI": (-1, 0, 0, 0, 1, 0, 0, 0, -1),
}


@dataclass(frozen=True)
class Grid:
    """A voxel grid: size (x, y, z), spacing (mm), orientation code; centred on the patient origin."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str = "LPS"

    @property
    def direction(self) -> np.ndarray:
        return np.array(ORIENTATIONS[self.orientation], dtype=float).reshape(3, 3)

    @property
    def origin(self) -> np.ndarray:
        # Chosen so that the grid's centre sits at (0, 0, 0) mm whatever the orientation.
        half = (np.array(self.size) - 1) / 2.0 * np.array(self.spacing)
        return -self.direction @ half

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Physical LPS coordinates (mm) of every voxel centre, each broadcast to shape (z, y, x)."""
        shape = self.size[::-1]
        direction = self.direction
        if not np.allclose(np.abs(direction), np.eye(3)):
            raise ValueError(f"demo grids are axis-aligned; got orientation {self.orientation}")
        origin = self.origin
        coords = [np.float32(origin[a]) + np.float32(direction[a, a] * self.spacing[a])
                  * np.arange(self.size[a], dtype=np.float32) for a in range(3)]
        # x varies along array axis 2, y along 1, z along 0: broadcast views cost no memory.
        return (np.broadcast_to(coords[0][None, None, :], shape), np.broadcast_to(coords[1][None, :, None], shape),
                np.broadcast_to(coords[2][:, None, None], shape))

    def to_image(self, array: np.ndarray, pixel: int) -> sitk.Image:
        """Wrap a (z, y, x) array as a SimpleITK image of this grid with the given pixel type."""
        image = sitk.Cast(sitk.GetImageFromArray(array), pixel)
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetOrigin([float(o) for o in self.origin])
        image.SetDirection([float(d) for d in self.direction.ravel()])
        return image


def fov_grid(fov_mm: tuple[float, float, float], spacing: tuple[float, float, float], orientation: str) -> Grid:
    """The grid that covers ``fov_mm`` with ``spacing``."""
    size = tuple(int(round(f / s)) for f, s in zip(fov_mm, spacing))
    return Grid(size, spacing, orientation)  # type: ignore[arg-type]


def rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random rotation matrix with angles up to ``max_degrees`` about each axis."""
    ax, ay, az = np.deg2rad(rng.uniform(-max_degrees, max_degrees, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _axis_coordinates(points: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-D x, y, z coordinates along array axes 2, 1, 0 (the demo grids are axis-aligned)."""
    x, y, z = points
    return x[0, 0, :], y[0, :, 0], z[:, 0, 0]


def blob(points: tuple[np.ndarray, np.ndarray, np.ndarray], center: np.ndarray, semi_axes: np.ndarray,
         rng: np.random.Generator, wobble: float = 0.08, max_rotation: float = 12.0) -> np.ndarray:
    """A smooth ellipsoid-like blob: a rotated ellipsoid whose surface is perturbed by low-frequency waves."""
    rot = rotation(rng, max_rotation)
    waves = []
    for _ in range(3):
        direction = rng.normal(size=3)
        waves.append((direction / np.linalg.norm(direction), rng.uniform(1.0, 2.5), rng.uniform(0, 2 * np.pi)))
    # Only the blob's bounding box is evaluated: a rotated, wobbled ellipsoid stays inside this radius.
    reach = 1.3 * float(np.max(semi_axes))
    xs, ys, zs = _axis_coordinates(points)
    ranges = [np.flatnonzero(np.abs(coords - c) <= reach)
              for coords, c in ((zs, center[2]), (ys, center[1]), (xs, center[0]))]
    mask = np.zeros(points[0].shape, dtype=bool)
    if any(r.size == 0 for r in ranges):
        return mask
    box = tuple(slice(int(r[0]), int(r[-1]) + 1) for r in ranges)
    zz, yy, xx = np.meshgrid(zs[box[0]], ys[box[1]], xs[box[2]], indexing="ij")
    d = [xx - np.float32(center[0]), yy - np.float32(center[1]), zz - np.float32(center[2])]
    local = [sum(np.float32(rot[r, c]) * d[r] for r in range(3)) / np.float32(semi_axes[c]) for c in range(3)]
    radius2 = local[0] ** 2 + local[1] ** 2 + local[2] ** 2
    for direction, frequency, phase in waves:
        wave = np.cos(frequency * (direction[0] * local[0] + direction[1] * local[1] + direction[2] * local[2]) + phase)
        radius2 = radius2 + np.float32(wobble) * wave.astype(np.float32)
    mask[box] = radius2 <= 1.0
    return mask


def ellipse_cylinder(points: tuple[np.ndarray, np.ndarray, np.ndarray], center_xy: tuple[float, float],
                     semi_xy: tuple[float, float]) -> np.ndarray:
    """An elliptic cylinder along z (body outlines, the spine)."""
    x, y, _ = points
    return ((x - center_xy[0]) / semi_xy[0]) ** 2 + ((y - center_xy[1]) / semi_xy[1]) ** 2 <= 1.0


def smooth_field(shape: tuple[int, ...], rng: np.random.Generator, sigma_vox: float, amplitude: float) -> np.ndarray:
    """Low-frequency random texture with standard deviation about ``amplitude``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox)
    scale = float(noise.std()) or 1.0
    return noise * np.float32(amplitude / scale)


def bias_field(points: tuple[np.ndarray, np.ndarray, np.ndarray], rng: np.random.Generator, strength: float,
               extent_mm: float = 150.0) -> np.ndarray:
    """A smooth multiplicative MRI bias field: exp of a random quadratic polynomial of position."""
    x, y, z = (p / np.float32(extent_mm) for p in points)
    terms = [x, y, z, x * y, y * z, x * z, x * x, y * y, z * z]
    coefficients = rng.normal(scale=strength, size=len(terms)).astype(np.float32)
    log_field = sum(c * t for c, t in zip(coefficients, terms))
    return np.exp(log_field - log_field.mean()).astype(np.float32)


def blur(array: np.ndarray, sigma_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Gaussian blur with a physical sigma (scanner resolution); spacing is (x, y, z)."""
    if sigma_mm <= 0:
        return array
    sigma = [sigma_mm / s for s in spacing[::-1]]
    return ndimage.gaussian_filter(array, sigma)


def random_point_inside(mask: np.ndarray, points: tuple[np.ndarray, np.ndarray, np.ndarray],
                        rng: np.random.Generator, margin_vox: int = 2) -> np.ndarray | None:
    """A random physical point well inside ``mask`` (eroded by ``margin_vox``), or None if none is left."""
    inner = ndimage.binary_erosion(mask, iterations=margin_vox) if margin_vox else mask
    candidates = np.flatnonzero(inner)
    if candidates.size == 0:
        return None
    flat = candidates[rng.integers(candidates.size)]
    k, j, i = np.unravel_index(flat, mask.shape)
    return np.array([points[0][k, j, i], points[1][k, j, i], points[2][k, j, i]], dtype=float)
