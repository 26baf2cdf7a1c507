"""Pictures for the human report (matplotlib, Agg): lesion outlines, attention heat maps,
original vs pseudo-healthy.

Everything is shown in radiological convention whatever the series' orientation: arrays are
reoriented to LPS (a permutation / flip of axes, no interpolation), so an
axial slice has the patient's right on the viewer's left and anterior at the top; axes are
in millimetres so anisotropic voxels keep their true aspect.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import patheffects  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402

from diffugts.artifacts.geometry import Geometry, nearest_axis_frame  # noqa: E402

DPI = 110
# CT windows (level, width) by the prompt's organ; soft tissue otherwise.
CT_WINDOWS = {"lung": (-600, 1500), "bone": (400, 1800), "brain": (40, 80)}
SOFT_TISSUE = (40, 400)
HEAT = LinearSegmentedColormap.from_list(
    "heat", [(0.0, (1, 1, 0, 0)), (0.15, (1, 0.85, 0, 0.35)), (0.5, (1, 0.45, 0, 0.65)), (1.0, (0.85, 0, 0, 0.85))]
)

_HALO = [patheffects.withStroke(linewidth=2.5, foreground="black")]  # text readable on any grey


@dataclass
class View:
    """An array reoriented to LPS: ``data[z, y, x]``, x to the patient's left, y posterior."""

    data: np.ndarray
    origin: np.ndarray  # (x, y, z) mm of data[0, 0, 0]
    spacing: np.ndarray  # (x, y, z) mm

    def extent(self) -> list[float]:
        """imshow extent of an axial slice: [left, right, bottom, top] in mm."""
        nz, ny, nx = self.data.shape
        (x0, y0, _), (sx, sy, _) = self.origin, self.spacing
        return [x0 - sx / 2, x0 + (nx - 0.5) * sx, y0 + (ny - 0.5) * sy, y0 - sy / 2]

    def coronal_extent(self) -> list[float]:
        nz, ny, nx = self.data.shape
        (x0, _, z0), (sx, _, sz) = self.origin, self.spacing
        return [x0 - sx / 2, x0 + (nx - 0.5) * sx, z0 - sz / 2, z0 + (nz - 0.5) * sz]

    def z_mm(self, k: int) -> float:
        return float(self.origin[2] + k * self.spacing[2])


class Orientation:
    """Maps arrays on a grid to LPS-ordered views (numpy transpose / flip: no copies), the
    grid's axes matched to the nearest patient axes (an oblique grid is shown as if
    axis-aligned: fine for pictures, never used for measurements)."""

    def __init__(self, geometry: Geometry):
        frame = nearest_axis_frame(geometry.direction)  # frame[world axis, index axis] = +-1
        self.axes, self.flips, spacing = [], [], np.zeros(3)
        first = [0, 0, 0]  # (k, j, i) of the view's first voxel
        for world in (2, 1, 0):  # view axes z, y, x
            ijk = int(np.argmax(np.abs(frame[world])))
            array_axis = 2 - ijk
            self.axes.append(array_axis)
            self.flips.append(bool(frame[world, ijk] < 0))
            spacing[world] = geometry.spacing[ijk]
            if self.flips[-1]:
                first[array_axis] = geometry.shape[array_axis] - 1
        self.spacing = spacing
        self.origin = geometry.world(first[::-1])

    def __call__(self, array: np.ndarray) -> View:
        out = np.transpose(array, self.axes)
        for axis, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis)
        return View(out, self.origin, self.spacing)


def window_for(modality: str, organ: str | None, volume: View) -> tuple[float, float]:
    """(vmin, vmax) for the grey scale."""
    if modality == "CT":
        level, width = CT_WINDOWS.get(organ or "", SOFT_TISSUE)
        return level - width / 2, level + width / 2
    body = volume.data[volume.data > np.percentile(volume.data, 20)]
    lo, hi = np.percentile(body if body.size else volume.data, [0.5, 99.5])
    return float(lo), float(hi)


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def _grey(ax, img: View, k: int, window, crop=None):
    ax.imshow(img.data[k], cmap="gray", vmin=window[0], vmax=window[1], extent=img.extent(), interpolation="bilinear")
    _style(ax, crop)


def _style(ax, crop=None):
    ax.set_xticks([])
    ax.set_yticks([])
    if crop is not None:
        (x0, x1), (y0, y1) = crop
        ax.set_xlim(x0, x1)
        ax.set_ylim(y1, y0)
    # orientation letters: radiological convention
    for x, letter, ha in ((0.01, "R", "left"), (0.99, "L", "right")):
        ax.text(
            x,
            0.5,
            letter,
            transform=ax.transAxes,
            color="w",
            fontsize=9,
            va="center",
            ha=ha,
            weight="bold",
            path_effects=_HALO,
        )


def _outline(ax, img: View, mask2d: np.ndarray, colour, width=1.6):
    if mask2d.any():
        nz, ny, nx = img.data.shape
        xs = img.origin[0] + np.arange(nx) * img.spacing[0]
        ys = img.origin[1] + np.arange(ny) * img.spacing[1]
        ax.contour(xs, ys, mask2d.astype(float), levels=[0.5], colors=[colour], linewidths=width)


def _scale_bar(ax, crop, length_mm: float = 20.0):
    (x0, x1), (y0, y1) = crop
    xa, ya = x0 + 0.05 * (x1 - x0), y1 - 0.06 * (y1 - y0)
    ax.plot([xa, xa + length_mm], [ya, ya], color="w", lw=2.5, solid_capstyle="butt")
    ax.text(
        xa + length_mm / 2,
        ya - 0.02 * (y1 - y0),
        f"{length_mm:.0f} mm",
        color="w",
        fontsize=8,
        ha="center",
        va="bottom",
        path_effects=_HALO,
    )


def body_crop(img: View, k: int, window, margin_mm: float = 10.0):
    """((x0, x1), (y0, y1)) around what is brighter than the window's floor on slice ``k``
    (the body on CT): scanners' fields of view are mostly air."""
    inside = img.data[k] > window[0] + 0.05 * (window[1] - window[0])
    if inside.sum() < 20:
        return None
    ys, xs = np.nonzero(inside)
    x = img.origin[0] + np.array([xs.min(), xs.max()]) * img.spacing[0]
    y = img.origin[1] + np.array([ys.min(), ys.max()]) * img.spacing[1]
    return (x[0] - margin_mm, x[1] + margin_mm), (y[0] - margin_mm, y[1] + margin_mm)


def crop_around(img: View, mask2d: np.ndarray, margin_mm: float, min_fov_mm: float = 80.0):
    """((x0, x1), (y0, y1)) in mm: a square around the mask, at least ``min_fov_mm`` wide."""
    ys, xs = np.nonzero(mask2d)
    cx = img.origin[0] + xs.mean() * img.spacing[0]
    cy = img.origin[1] + ys.mean() * img.spacing[1]
    half = max((xs.max() - xs.min() + 1) * img.spacing[0], (ys.max() - ys.min() + 1) * img.spacing[1]) / 2
    half = max(half + margin_mm, min_fov_mm / 2)
    return (cx - half, cx + half), (cy - half, cy + half)


def lesion_figure(vol: View, lesion: View, title: str, window, colour, diameter=None) -> bytes:
    """Full axial slice (the lesion boxed) and a zoom with the outline and the diameter;
    ``lesion`` is the lesion's mask."""
    mask = lesion.data
    k = int(np.argmax(mask.sum(axis=(1, 2))))  # largest cross-section, unless the diameter's slice
    if diameter is not None:
        k_d = int(round((diameter["z"] - vol.origin[2]) / vol.spacing[2]))
        k = k_d if 0 <= k_d < len(mask) and mask[k_d].any() else k
    crop = crop_around(vol, mask[k], margin_mm=25.0)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(9.0, 4.6), gridspec_kw={"width_ratios": [1, 1]})
    rgb = np.array(colour) / 255
    _grey(a0, vol, k, window, body_crop(vol, k, window))
    (x0, x1), (y0, y1) = crop
    a0.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=rgb, lw=1.5))
    _outline(a0, vol, mask[k], rgb, width=1.0)
    a0.set_title(f"axial, z = {vol.z_mm(k):.1f} mm", fontsize=9)
    _grey(a1, vol, k, window, crop)
    _outline(a1, vol, mask[k], rgb)
    if diameter is not None and abs(diameter["z"] - vol.z_mm(k)) < vol.spacing[2] / 2:
        (xa, ya), (xb, yb) = diameter["ends"]
        a1.plot([xa, xb], [ya, yb], color="#00e5ff", lw=1.4, ls="--")
        a1.text(
            (xa + xb) / 2,
            (ya + yb) / 2,
            f" {diameter['mm']:.0f} mm",
            color="#00e5ff",
            fontsize=9,
            weight="bold",
            path_effects=_HALO,
        )
    _scale_bar(a1, crop)
    a1.set_title("zoom: outline, longest axial diameter", fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return png_bytes(fig)


def attention_figure(vol: View, prob: View, lesion_mask: View | None, title: str, window) -> bytes:
    """Axial and coronal slices through the attention peak, heat overlay with a colour bar."""
    if prob.data.max() > 0:
        k, j, _ = (int(v) for v in np.unravel_index(int(np.argmax(prob.data)), prob.data.shape))
    else:  # nothing anywhere: the middle of the volume
        k, j = prob.data.shape[0] // 2, prob.data.shape[1] // 2
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10.0, 4.8))
    _grey(a0, vol, k, window, body_crop(vol, k, window))
    im = a0.imshow(prob.data[k], cmap=HEAT, vmin=0, vmax=1, extent=vol.extent(), interpolation="bilinear")
    if lesion_mask is not None:
        _outline(a0, vol, lesion_mask.data[k] > 0, "#00e5ff", width=1.0)
    a0.set_title(f"axial through the peak, z = {vol.z_mm(k):.1f} mm", fontsize=9)
    a1.imshow(
        vol.data[:, j, :],
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        extent=vol.coronal_extent(),
        origin="lower",
        interpolation="bilinear",
    )
    a1.imshow(
        prob.data[:, j, :],
        cmap=HEAT,
        vmin=0,
        vmax=1,
        extent=vol.coronal_extent(),
        origin="lower",
        interpolation="bilinear",
    )
    a1.axhline(vol.z_mm(k), color="w", lw=0.6, ls=":")
    _style(a1)
    a1.set_title(f"coronal through the peak, y = {vol.origin[1] + j * vol.spacing[1]:.1f} mm", fontsize=9)
    cbar = fig.colorbar(im, ax=[a0, a1], fraction=0.025, pad=0.02, shrink=0.8)
    cbar.set_label("anomaly probability", fontsize=8)
    fig.suptitle(title, fontsize=11)
    return png_bytes(fig)


def synthesis_figure(vol: View, healthy: View, lesion: View, title: str, window, units: str = "HU") -> bytes:
    """Original | pseudo-healthy | absolute difference, zoomed on one lesion (its mask)."""
    mask = lesion.data
    k = int(np.argmax(mask.sum(axis=(1, 2))))
    crop = crop_around(vol, mask[k], margin_mm=35.0, min_fov_mm=110.0)
    diff = np.abs(vol.data[k] - healthy.data[k])
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 4.5))
    _grey(axes[0], vol, k, window, crop)
    _outline(axes[0], vol, mask[k], "#ff3030", width=1.0)
    axes[0].set_title("original (lesion outlined)", fontsize=9)
    _grey(axes[1], healthy, k, window, crop)
    axes[1].set_title("pseudo-healthy", fontsize=9)
    width = window[1] - window[0]
    im = axes[2].imshow(diff, cmap="magma", vmin=0, vmax=width / 2, extent=vol.extent(), interpolation="bilinear")
    _style(axes[2], crop)
    axes[2].set_title("|original - pseudo-healthy|", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046, pad=0.02).set_label(units, fontsize=8)
    fig.suptitle(title, fontsize=11)
    return png_bytes(fig)
