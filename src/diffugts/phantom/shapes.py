"""Implicit shape primitives evaluated on (warped) body-frame coordinate arrays.

Each primitive returns a *normalised radius* ``q`` (float32): ``q < 1`` inside, ``q == 1`` on
the surface, growing outward roughly like distance / radius. Keeping everything as ``q`` fields
lets callers make shells (``q > 1 - t / r``), soft margins and unions (``np.minimum``) cheaply.
"""

from __future__ import annotations

import numpy as np


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation matrix (body -> local axes) from angles in degrees about z, y and x."""
    a, b, c = np.deg2rad([yaw, pitch, roll])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return (rz @ ry @ rx).T


def local(Z, Y, X, center, rot=None):
    """Coordinates relative to ``center`` (x, y, z), optionally rotated; returns (u, v, w)."""
    dx, dy, dz = X - np.float32(center[0]), Y - np.float32(center[1]), Z - np.float32(center[2])
    if rot is None:
        return dx, dy, dz
    r = np.asarray(rot, dtype=np.float32)
    return (
        r[0, 0] * dx + r[0, 1] * dy + r[0, 2] * dz,
        r[1, 0] * dx + r[1, 1] * dy + r[1, 2] * dz,
        r[2, 0] * dx + r[2, 1] * dy + r[2, 2] * dz,
    )


def ellipsoid(Z, Y, X, center, radii, rot=None, power: float = 2.0):
    """Normalised radius of a (super-)ellipsoid; ``power`` > 2 makes it boxier."""
    u, v, w = local(Z, Y, X, center, rot)
    if power == 2.0:
        return np.sqrt((u / radii[0]) ** 2 + (v / radii[1]) ** 2 + (w / radii[2]) ** 2)
    s = np.abs(u / radii[0]) ** power + np.abs(v / radii[1]) ** power + np.abs(w / radii[2]) ** power
    return s ** (1.0 / power)


def tube(Z, Y, X, points, radii):
    """Normalised radius of a tube along a polyline (points (x, y, z) mm, radius per point)."""
    pts = np.asarray(points, dtype=np.float32)
    rad = np.broadcast_to(np.asarray(radii, dtype=np.float32), (len(pts),))
    q = None
    for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
        ab = b - a
        L2 = float(ab @ ab) or 1e-6
        px, py, pz = X - a[0], Y - a[1], Z - a[2]
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / L2, 0.0, 1.0)
        d = np.sqrt((px - t * ab[0]) ** 2 + (py - t * ab[1]) ** 2 + (pz - t * ab[2]) ** 2)
        qs = d / (ra + t * (rb - ra))
        q = qs if q is None else np.minimum(q, qs)
    return q


def bbox(points, radius, margin):
    """(lo, hi) mm extents (x, y, z) of a set of points grown by radius + margin."""
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    r = np.max(radius) + margin
    return pts.min(0) - r, pts.max(0) + r


def ramp(x, width):
    """Soft step from 1 (x <= -width/2) to 0 (x >= width/2); float32."""
    return np.clip(0.5 - x / max(width, 1e-3), 0.0, 1.0).astype(np.float32)
