"""The lesion library: types that differ the way real tumours do, placed inside organs.

A lesion is an implicit shape (normalised radius ``q``, ``q < 1`` inside) made of compartments
(solid body, capsule, rim, necrotic core) whose intensities are set *relative to the host organ*
(CT: HU offsets; MR: factors) or to water (cysts, necrosis). Its ground-truth mask is
``q < 1`` intersected with the host organ's mask, so every lesion lies inside its organ by
construction. All random draws (shape, size, contrast) happen at placement, from the lesion
stream, so the same lesions come out in CT and MR and the anatomy/noise do not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from diffugts.phantom.anatomy import Anatomy
from diffugts.phantom.grid import Grid, smooth_noise
from diffugts.phantom.labels import ORGAN_BY_NAME, T
from diffugts.phantom.render import fluid_value, host_value
from diffugts.phantom.shapes import ellipsoid, ramp, rotation

HOST_ORGANS = ("liver", "right kidney", "left kidney", "spleen", "pancreas")


@dataclass(frozen=True)
class LesionType:
    key: str
    description: str
    diameter_mm: tuple[float, float]  # range of one lesion (one nodule for multifocal)
    margin_mm: float  # width of the soft edge: sharp cysts .. ill-defined infiltration
    lobulation: float  # amplitude of the shape perturbation (0 = smooth ellipsoid)
    lobe_mm: float  # correlation length of that perturbation
    prompts: tuple[str, ...]  # templates: {organ} = family ("kidney"), {adj} = "renal"
    organs: tuple[str, ...] = HOST_ORGANS
    specific: dict = field(default_factory=dict)  # organ family -> extra prompt


LESION_TYPES: dict[str, LesionType] = {
    t.key: t
    for t in (
        LesionType(
            "hypodense",
            "well-defined round hypodense lesion (metastasis-like)",
            (12, 45),
            2.0,
            0.08,
            12,
            ("{organ} tumor", "{adj} metastasis", "hypodense {organ} lesion"),
            specific={"pancreas": "pancreatic adenocarcinoma"},
        ),
        LesionType(
            "hyperenhancing",
            "lobulated hyperenhancing solid tumour with mosaic texture and optional capsule (HCC-like)",
            (15, 60),
            1.0,
            0.15,
            10,
            ("{organ} tumor", "hyperenhancing {organ} lesion"),
            specific={
                "liver": "hepatocellular carcinoma",
                "kidney": "renal cell carcinoma",
                "pancreas": "pancreatic neuroendocrine tumor",
                "spleen": "splenic hemangioma",
            },
        ),
        LesionType(
            "cystic",
            "water-density cyst with a sharp wall",
            (8, 50),
            0.5,
            0.03,
            15,
            ("{organ} cyst", "cystic {organ} lesion", "simple {adj} cyst"),
        ),
        LesionType(
            "rim_necrotic",
            "rim-enhancing tumour with a necrotic core",
            (25, 70),
            1.5,
            0.12,
            10,
            ("{organ} tumor", "necrotic {organ} tumor", "rim-enhancing {organ} lesion"),
        ),
        LesionType(
            "infiltrative",
            "ill-defined infiltrative tumour with irregular margins",
            (25, 65),
            4.0,
            0.4,
            5,
            ("{organ} tumor", "infiltrative {organ} tumor", "ill-defined {organ} lesion"),
        ),
        LesionType(
            "multifocal",
            "multiple small hypodense nodules",
            (8, 16),
            1.0,
            0.05,
            4,
            ("{organ} tumor", "multiple {organ} lesions", "{adj} metastases"),
            organs=("liver", "right kidney", "left kidney", "spleen"),
        ),
    )
}
MULTIFOCAL_COUNT = (3, 8)
# renal parenchyma enhances strongly in portal venous phase, so lesions there stand out more
CONTRAST_GAIN = {"kidney": 1.5}
MIN_VOXELS = 8  # smaller lesions are re-placed (a nodule must span more than ~2 voxels)


def prompts(type_key: str, organ: str) -> list[str]:
    t, o = LESION_TYPES[type_key], ORGAN_BY_NAME[organ]
    out = [p.format(organ=o.family, adj=o.adjective) for p in t.prompts]
    if o.family in t.specific:
        out.append(t.specific[o.family])
    return out


@dataclass
class Lesion:
    id: int
    type: str
    organ: str
    group: int  # lesions planned together (the nodules of one multifocal entry) share it
    box: tuple  # index box (z, y, x slices)
    q: np.ndarray  # normalised radius in the box
    mask: np.ndarray  # ground truth in the box (q < 1, inside the organ, not another lesion)
    radius_mm: float
    compartments: list  # outer first; see _look
    texture: np.ndarray  # unit smooth noise in the box


def place_lesions(anat: Anatomy, grid: Grid, plan, rng: np.random.Generator) -> list[Lesion]:
    """Place ``plan`` = [(type, organ), ...]; lesions that do not fit are dropped."""
    taken = np.zeros(grid.shape, bool)
    edts: dict[str, tuple] = {}
    out: list[Lesion] = []
    for group, (tkey, organ) in enumerate(plan, start=1):
        t = LESION_TYPES[tkey]
        n = int(rng.integers(MULTIFOCAL_COUNT[0], MULTIFOCAL_COUNT[1] + 1)) if tkey == "multifocal" else 1
        for _ in range(n):
            if organ not in edts:
                edts[organ] = _organ_edt(anat, grid, organ)
            les = _place_one(t, organ, grid, edts[organ], taken, rng, len(out) + 1, group)
            if les is not None:
                taken[les.box] |= les.mask
                out.append(les)
    return out


def _organ_edt(anat, grid, organ):
    """(box, organ mask, distance to the edge of the organ's parenchyma) in the organ's box."""
    m = anat.organs == ORGAN_BY_NAME[organ].label
    if not m.any():
        return None
    idx = np.nonzero(m)
    box = tuple(slice(max(int(i.min()) - 1, 0), int(i.max()) + 2) for i in idx)
    # centres go into parenchyma, not into the renal sinus fat the kidney label also holds
    paren = m[box] & (anat.tissue[box] != T.renal_sinus)
    return box, m[box], ndimage.distance_transform_edt(paren, sampling=grid.spacing[::-1])


def _place_one(t, organ, grid, edt, taken, rng, lid, group):
    if edt is None or edt[2].max() < 2.0:  # organ absent or too thin to host a lesion
        return None
    obox, omask, dist = edt
    sp = np.asarray(grid.spacing[::-1])
    lo, hi = np.log(t.diameter_mm[0]), np.log(t.diameter_mm[1])
    r = float(np.exp(rng.uniform(lo, hi))) / 2
    r = min(r, float(dist.max()) * 1.15)
    need = r if t.key == "multifocal" else 0.6 * r
    cand = np.flatnonzero((dist >= min(need, dist.max() * 0.9)).ravel())
    look = _look(t.key, r, rng)
    radii = r * rng.uniform(0.8, 1.2, 3)
    rot = rotation(*rng.uniform(0, 180, 3))
    for _ in range(12):  # a few tries to avoid other lesions
        c = np.array(np.unravel_index(cand[rng.integers(len(cand))], omask.shape))
        c = c + np.array([s.start for s in obox])
        half = np.ceil((r * 1.5 + t.margin_mm * 2) / sp).astype(int) + 1
        box = tuple(slice(max(ci - h, 0), min(ci + h + 1, n)) for ci, h, n in zip(c, half, grid.shape))
        Z, Y, X = np.meshgrid(*[(np.arange(s.start, s.stop) - ci) * d for s, ci, d in zip(box, c, sp)], indexing="ij")
        q = ellipsoid(Z.astype(np.float32), Y.astype(np.float32), X.astype(np.float32), (0, 0, 0), radii, rot)
        if t.lobulation:
            pert = smooth_noise(rng, q.shape, t.lobe_mm / sp)
            q = q / np.maximum(1 + np.float32(t.lobulation) * pert, 0.3)
        organ_box = _organ_in(box, obox, omask)
        mask = (q < 1) & organ_box
        if mask.sum() < MIN_VOXELS or (ndimage.binary_dilation(mask) & taken[box]).any():
            continue
        tex = smooth_noise(rng, q.shape, 1.5 / sp)
        return Lesion(lid, t.key, organ, group, box, q.astype(np.float32), mask, r, look, tex)
    return None


def _organ_in(box, obox, omask):
    """The organ mask cut out for ``box`` (zeros outside the organ's own box)."""
    out = np.zeros(tuple(s.stop - s.start for s in box), bool)
    src, dst = [], []
    for b, o in zip(box, obox):
        a, e = max(b.start, o.start), min(b.stop, o.stop)
        if e <= a:
            return out
        src.append(slice(a - o.start, e - o.start))
        dst.append(slice(a - b.start, e - b.start))
    out[tuple(dst)] = omask[tuple(src)]
    return out


def _look(key, r, rng):
    """Compartments, outer first: dict(q=outer boundary, ct=(ref, value), t1/t2=(ref, factor),
    tex=(CT HU, MR fraction), edge=soft width in mm). ref: 'host' organ or 'fluid' (water)."""
    u = rng.uniform
    if key in ("hypodense", "multifocal"):
        d = u(40, 65) if key == "hypodense" else u(35, 60)
        return [
            dict(q=1.0, ct=("host", -d), t1=("host", u(0.55, 0.7)), t2=("host", u(1.5, 1.9)), tex=(6, 0.05), edge=0)
        ]
    if key == "hyperenhancing":
        body = dict(
            q=1.0, ct=("host", u(40, 70)), t1=("host", u(0.75, 0.9)), t2=("host", u(1.3, 1.6)), tex=(14, 0.1), edge=0
        )
        if rng.random() < 0.5:  # hypodense capsule, ~2 mm
            cap = dict(q=1.0, ct=("host", -u(10, 25)), t1=("host", 0.7), t2=("host", 1.1), tex=(4, 0.03), edge=0)
            return [cap, dict(body, q=1 - 2.0 / r, edge=1.0)]
        return [body]
    if key == "cystic":
        return [
            dict(
                q=1.0,
                ct=("abs", u(0, 15)),
                t1=("fluid", u(0.9, 1.1)),
                t2=("fluid", u(0.9, 1.0)),
                tex=(1.5, 0.01),
                edge=0,
            )
        ]
    if key == "rim_necrotic":
        rim = dict(
            q=1.0, ct=("host", u(20, 45)), t1=("host", u(0.8, 0.95)), t2=("host", u(1.3, 1.6)), tex=(10, 0.08), edge=0
        )
        core = dict(
            q=u(0.5, 0.7),
            ct=("abs", u(10, 30)),
            t1=("fluid", u(1.2, 1.6)),
            t2=("fluid", u(0.7, 0.9)),
            tex=(6, 0.05),
            edge=2.5,
        )
        return [rim, core]
    if key == "infiltrative":
        return [
            dict(
                q=1.0,
                ct=("host", -u(25, 45)),
                t1=("host", u(0.75, 0.85)),
                t2=("host", u(1.25, 1.45)),
                tex=(10, 0.08),
                edge=0,
            )
        ]
    raise KeyError(key)


def _value(spec, modality, host, fluid, gain=1.0):
    ref, v = spec
    if ref != "host":
        return v if modality == "CT" else fluid * v
    return host + gain * v if modality == "CT" else host * (1 + gain * (v - 1))


def paint_lesions(img: np.ndarray, lesions: list[Lesion], modality: str, values, anat: Anatomy) -> None:
    """Blend lesions into ``img`` (in place), before PSF and noise."""
    fluid = fluid_value(values)
    col = {"CT": "ct", "T1": "t1", "T2": "t2"}[modality]
    for les in lesions:
        t = LESION_TYPES[les.type]
        family = ORGAN_BY_NAME[les.organ].family
        host, gain = host_value(values, family), CONTRAST_GAIN.get(family, 1.0)
        organ = anat.organs[les.box] == ORGAN_BY_NAME[les.organ].label
        val = None
        for comp in les.compartments:
            v = _value(comp[col], modality, host, fluid, gain)
            tex = comp["tex"][0] if modality == "CT" else comp["tex"][1] * host
            cv = np.float32(v) + np.float32(tex) * les.texture
            if val is None:
                val = cv
            else:
                w_in = ramp((les.q - comp["q"]) * les.radius_mm, comp["edge"])
                val = val * (1 - w_in) + cv * w_in
        w = ramp((les.q - 1.0) * les.radius_mm, t.margin_mm) * organ
        w[les.mask] = np.maximum(w[les.mask], 0.5)
        region = img[les.box]
        region[...] = region * (1 - w) + val * w
