"""Tissue map (+ lesions) -> image: CT in HU (portal venous phase), MR T1-like / T2-like.

Per case every tissue gets a value drawn around its table mean (enhancement timing, scanner and
patient differ), plus a texture amplitude applied to a shared smooth noise field. Then the
point-spread function blurs edges (partial volume), and scanner noise is added: Gaussian,
slightly correlated, for CT; Rician on top of a smooth coil bias field for MR. MR units are
arbitrary (0..4095), as on real scanners.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from diffugts.phantom.anatomy import Anatomy
from diffugts.phantom.grid import Grid, smooth_noise
from diffugts.phantom.labels import TISSUES

MODALITIES = ("CT", "T1", "T2")  # CT, MR T1-weighted-like, MR T2-weighted-like

# tissue: (CT mean HU, between-case sd, texture sd), (T1 mean, sd, tex), (T2 mean, sd, tex)
TABLE: dict[str, tuple[tuple[float, float, float], ...]] = {
    "air": ((-1000, 0, 2), (4, 1, 1), (4, 1, 1)),
    "skin": ((35, 8, 6), (420, 30, 20), (260, 30, 20)),
    "subcutaneous_fat": ((-105, 8, 7), (900, 60, 30), (640, 50, 30)),
    "visceral_fat": ((-95, 8, 10), (860, 60, 40), (600, 50, 35)),
    "muscle": ((55, 6, 6), (330, 25, 15), (150, 15, 10)),
    "liver": ((82, 12, 5), (520, 40, 15), (190, 20, 10)),
    "portal_vessel": ((165, 18, 6), (180, 30, 15), (70, 15, 10)),
    "spleen": ((105, 10, 5), (390, 30, 15), (430, 35, 15)),
    "kidney_cortex": ((160, 20, 6), (430, 30, 15), (420, 35, 15)),
    "kidney_medulla": ((140, 18, 6), (320, 30, 15), (560, 40, 20)),
    "renal_sinus": ((-70, 15, 20), (780, 60, 40), (560, 50, 35)),
    "pancreas": ((95, 10, 8), (580, 40, 25), (300, 30, 20)),
    "artery": ((175, 25, 4), (120, 25, 10), (45, 10, 8)),
    "vein": ((150, 20, 5), (160, 30, 10), (60, 12, 8)),
    "trabecular_bone": ((260, 40, 45), (620, 50, 60), (430, 40, 50)),
    "cortical_bone": ((850, 80, 60), (40, 10, 8), (30, 8, 6)),
    "disc": ((85, 10, 8), (300, 25, 15), (560, 60, 30)),
    "csf": ((10, 4, 3), (150, 20, 8), (950, 50, 20)),
    "bowel_wall": ((95, 12, 8), (380, 30, 20), (220, 25, 15)),
    "bowel_fluid": ((15, 8, 6), (140, 25, 15), (880, 60, 40)),
    "gas": ((-990, 5, 8), (5, 2, 2), (5, 2, 2)),
    "stool": ((-130, 40, 110), (300, 60, 120), (300, 60, 120)),
    "oral_contrast": ((260, 50, 25), (140, 25, 15), (880, 60, 40)),
    "lung": ((-860, 25, 18), (12, 3, 4), (15, 4, 5)),
    "lung_vessel": ((-80, 40, 30), (60, 15, 10), (50, 15, 10)),
    "blood_pool": ((165, 25, 4), (140, 25, 10), (60, 15, 8)),
    "myocardium": ((100, 10, 5), (350, 25, 12), (140, 15, 8)),
    "bile": ((8, 5, 2), (160, 30, 6), (950, 50, 15)),
    "bone": ((480, 80, 110), (380, 50, 90), (260, 40, 70)),
}
assert tuple(TABLE) == TISSUES, "TABLE must list TISSUES in order"

# organ family -> the tissue a lesion's contrast is measured against
HOST_TISSUE = {"liver": "liver", "spleen": "spleen", "kidney": "kidney_cortex", "pancreas": "pancreas"}
FLUID_TISSUE = "bile"  # water-like reference for cysts and necrosis

CT_NOISE_HU = (8.0, 14.0)  # per-case noise sd range
MR_NOISE = (0.015, 0.03)  # Rician sigma as a fraction of the fat signal
PSF_FWHM_MM = (3.0, 3.0, 4.0)  # x, y, z
TEXTURE_MM = 2.2  # correlation length of tissue texture


def tissue_values(modality: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-case (value, texture amplitude) for every tissue class."""
    col = MODALITIES.index(modality)
    spec = np.array([TABLE[t][col] for t in TISSUES], dtype=np.float64)
    z = rng.standard_normal(len(TISSUES))
    vals = spec[:, 0] + spec[:, 1] * np.clip(z, -2, 2)
    if modality == "CT":
        # enhancement phase is shared: blood-like tissues move together with the aorta
        phase = rng.uniform(-1, 1)
        for t, k in (
            ("artery", 25),
            ("vein", 20),
            ("portal_vessel", 18),
            ("blood_pool", 22),
            ("kidney_cortex", 20),
            ("kidney_medulla", 18),
            ("spleen", 8),
            ("liver", 8),
        ):
            vals[TISSUES.index(t)] = TABLE[t][0][0] + k * phase + TABLE[t][0][1] * 0.5 * z[TISSUES.index(t)]
        # the medulla stays darker than the cortex in portal venous phase
        i, j = TISSUES.index("kidney_cortex"), TISSUES.index("kidney_medulla")
        vals[j] = min(max(vals[j], vals[i] - 30), vals[i] - 10)
        i, j = TISSUES.index("liver"), TISSUES.index("spleen")
        vals[j] = max(vals[j], vals[i] + 5)  # spleen >= liver in portal venous phase
    else:
        vals *= rng.uniform(0.8, 1.25)  # arbitrary MR scale
    return vals.astype(np.float32), spec[:, 2].astype(np.float32)


def host_value(values: np.ndarray, family: str) -> float:
    return float(values[TISSUES.index(HOST_TISSUE[family])])


def fluid_value(values: np.ndarray) -> float:
    return float(values[TISSUES.index(FLUID_TISSUE)])


def base_image(anat: Anatomy, values, texture, rng: np.random.Generator, grid: Grid):
    """Piecewise-constant tissue values plus per-tissue texture (before PSF and noise)."""
    tex = smooth_noise(rng, grid.shape, TEXTURE_MM / np.asarray(grid.spacing[::-1]))
    return values[anat.tissue] + texture[anat.tissue] * tex


def finish(img: np.ndarray, modality: str, rng: np.random.Generator, grid: Grid, values) -> np.ndarray:
    """PSF blur, noise and quantisation -> float32 image of integers."""
    sig = np.asarray(PSF_FWHM_MM[::-1]) / 2.355 / np.asarray(grid.spacing[::-1])
    img = ndimage.gaussian_filter(img, sig, truncate=2.5)
    if modality == "CT":
        sd = rng.uniform(*CT_NOISE_HU)
        n = smooth_noise(rng, grid.shape, (0.0, 0.6, 0.6))
        img = img + np.float32(sd) * n
        return np.clip(np.rint(img), -1024, 3071).astype(np.float32)
    # MR: smooth receive-coil bias, then Rician magnitude noise
    z, y, x = grid.axes()
    bias = _bias_field(rng, z, y, x)
    sd = rng.uniform(*MR_NOISE) * values[TISSUES.index("subcutaneous_fat")]
    re = img * bias + np.float32(sd) * rng.standard_normal(grid.shape, dtype=np.float32)
    im = np.float32(sd) * rng.standard_normal(grid.shape, dtype=np.float32)
    img = np.sqrt(re * re + im * im)
    return np.clip(np.rint(img), 0, 4095).astype(np.float32)


def _bias_field(rng, z, y, x):
    # brighter near the coil elements (anterior and posterior), smooth everywhere
    ax, ay, az = rng.uniform(-0.15, 0.15, 3)
    bx = 1 + ax * x[None, None, :] / 180
    by = 1 + 0.15 * (y[None, :, None] / 180) ** 2 + ay * y[None, :, None] / 180
    bz = 1 + az * z[:, None, None] / 130
    return (bx * by * bz).astype(np.float32)
