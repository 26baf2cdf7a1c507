"""Body wall, chest and skeleton: outline, fat, muscles, diaphragm, lungs, heart, spine, ribs.

Builders take the canvas ``cv`` (see ``anatomy.Canvas``), the landmark namespace ``L`` they
read from and add to, and the anatomy random stream; ``anatomy.build_anatomy`` calls them in a
fixed order.
"""

from __future__ import annotations

import numpy as np

from diffugts.phantom.grid import smooth_noise
from diffugts.phantom.labels import O, T
from diffugts.phantom.shapes import ellipsoid, rotation

# --- body outline, fat and abdominal wall -------------------------------------------------


def body_wall(cv, L, rng):
    u = rng.uniform
    L.sex = "M" if rng.random() < 0.5 else "F"
    L.xc, L.yc = u(-6, 6), u(-6, 8)
    L.a, L.b_ant, L.b_post, L.expo = u(135, 162), u(98, 122), u(82, 96), u(2.1, 2.5)
    L.fat = u(6, 20) if L.sex == "M" else u(10, 26)
    L.wall = u(8, 12)
    L.a_cav = L.a - 1.15 * L.fat - 1.4 * L.wall  # half-width of the abdominal cavity
    Z, Y, X = cv.Z, cv.Y, cv.X
    dx, dy = X - np.float32(L.xc), Y - np.float32(L.yc)
    a = np.float32(L.a) * (1 + np.float32(0.04) * np.tanh(Z / np.float32(80)))
    # a fatter belly bulges more in the lower abdomen
    belly = np.float32(L.b_ant) * (1 + np.float32(0.003 * L.fat) * np.clip(-Z / 128, -1, 1))
    b = np.where(dy < 0, belly, np.float32(L.b_post))
    e = np.float32(L.expo)
    r = (np.abs(dx / a) ** e + np.abs(dy / b) ** e) ** (1 / e)
    rho = np.hypot(dx, dy)
    depth = rho * (1 / np.maximum(r, 1e-3) - 1)  # mm from the skin, along the ray from the centre
    cos_t = dy / np.maximum(rho, 1e-3)  # +1 posterior, -1 anterior
    sin2 = 1 - cos_t**2
    fat_t = np.float32(L.fat) * (1 - 0.3 * cos_t + 0.15 * sin2)
    linea = 1 - 0.6 * np.exp(-((dx / 9) ** 2)) * (cos_t < -0.7)  # thin linea alba
    wall_t = np.float32(L.wall) * (1 + 0.4 * sin2) * linea
    cv.depth, cv.cos_t = depth, cos_t
    cv.cav = depth - fat_t - wall_t  # mm inside the inner wall (the body cavity)
    full = (slice(None),) * 3
    inside = depth > 0
    cv.paint(full, inside, O.body, T.visceral_fat)
    cv.paint(full, inside & (depth < fat_t), O.subcutaneous_fat, T.subcutaneous_fat)
    cv.paint(full, inside & (depth < 1.5), None, T.skin)
    cv.paint(full, (depth >= fat_t) & (cv.cav < 0), O.muscle, T.muscle)


def diaphragm(cv, L, rng):
    u = rng.uniform
    L.zR = u(68, 96)  # right dome (breathing and habitus move it)
    L.zL = L.zR - u(5, 16)
    L.breath = L.zR - 82.0

    def zd(X, Y):
        def dome(z0, x0):
            dy = Y - np.float32(L.yc)
            hy = np.where(dy > 0, np.float32(55), np.float32(30))  # deep posterior recesses
            return z0 - 40 * ((X - x0) / 85) ** 2 - hy * (dy / 90) ** 2

        return np.maximum(dome(L.zR, L.xc - 55), dome(L.zL, L.xc + 55))

    cv.zd = zd


def spine_landmarks(L, rng):
    u = rng.uniform
    L.y_sp = L.yc + L.b_post - L.fat * 0.7 - u(66, 76)  # vertebral body centre
    L.rxv, L.ryv = u(19, 23), u(14, 17)
    L.level, L.level_phase = u(30, 35), u(0, 35)
    L.y_canal = L.y_sp + L.ryv + 11


def back_muscles(cv, L, rng):
    u = rng.uniform
    L.psoas_top = L.zL - u(80, 100)
    box = cv.box((L.xc - 110, L.y_sp - 40, -400), (L.xc + 110, L.y_sp + 90, 400))
    Z, Y, X = cv.at(box)
    ys = L.y_sp
    q = np.full(Z.shape, 9.0, np.float32)
    for s in (-1, 1):
        # erector spinae beside the spinous processes
        q = np.minimum(q, ellipsoid(Z, Y, X, (L.xc + s * 30, L.y_canal + 14, 0), (24, 21, 1e4)))
        # psoas grows from L1 downwards beside the vertebral bodies
        grow = np.clip((L.psoas_top - Z) / 90.0, 0, 1)
        rp = 6 + 16 * grow
        cx = L.xc + s * (L.rxv + rp - 3)
        q = np.minimum(q, np.hypot((X - cx) / rp, (Y - ys - 2) / (rp * 0.9)) + (grow <= 0) * 9)
        # quadratus lumborum behind the kidneys, lumbar levels
        ql = ellipsoid(Z, Y, X, (L.xc + s * 58, ys + 26, L.psoas_top - 60), (18, 11, 80))
        q = np.minimum(q, ql)
    cv.paint(box, (q < 1) & (cv.depth[box] > L.fat * 0.6), O.muscle, T.muscle)


# --- chest: lungs and heart above the diaphragm -------------------------------------------


def chest(cv, L, rng):
    u = rng.uniform
    box = cv.box((-200, -200, min(L.zL, L.zR) - 115), (200, 200, 400))
    Z, Y, X = cv.at(box)
    above = Z > cv.zd(X, Y)
    cav = cv.cav[box] > 0
    zm = (L.zR + L.zL) / 2 - 15  # central tendon under the heart
    hc = (L.xc + u(12, 24), L.yc - L.b_ant * u(0.25, 0.4), zm + u(40, 52))
    hq = ellipsoid(Z, Y, X, hc, (u(58, 68), u(44, 52), u(48, 56)), rotation(yaw=u(20, 40)))
    heart = (hq < 1) & above & cav
    myo = (hq > 0.8) | (Z < cv.zd(X, Y) + 9)
    cv.paint(box, heart, O.heart, np.where(myo, T.myocardium, T.blood_pool))
    medi = ((X - L.xc - 4) / 24) ** 2 + ((Y - L.y_sp + 10) / 45) ** 2 < 1
    lung = above & cav & (hq > 1.12) & ~medi
    right = X < L.xc + 4
    cv.paint(box, lung & right, O.right_lung, T.lung)
    cv.paint(box, lung & ~right, O.left_lung, T.lung)
    sig = 3.5 / np.asarray(cv.grid.spacing[::-1])
    f1, f2 = smooth_noise(rng, Z.shape, sig), smooth_noise(rng, Z.shape, sig)
    cv.paint(box, lung & (np.abs(f1) < 0.13) & (np.abs(f2) < 0.13), None, T.lung_vessel)


# --- bones ---------------------------------------------------------------------------------


def spine(cv, L, rng):
    box = cv.box((L.xc - 50, L.y_sp - L.ryv - 5, -400), (L.xc + 50, L.y_canal + 45, 400))
    Z, Y, X = cv.at(box)
    x, y = X - np.float32(L.xc), Y - np.float32(L.y_sp)
    s = ((Z - L.level_phase) / L.level) % 1.0  # position within one vertebral level
    qb = np.hypot(x / L.rxv, y / L.ryv)
    disc = s < 0.2
    body = qb < np.where(disc, 1.05, 1.0)
    yc = np.float32(L.y_canal - L.y_sp)
    rc = np.hypot(x, y - yc)
    canal = rc < 8.5
    arch = (rc < 15) & (y > yc - 8) & (s > 0.3) & (s < 0.85) & ~canal
    sp = ((Z - L.level_phase + 0.5 * (y - yc)) / L.level) % 1.0
    spinous = (np.abs(x) < 4) & (y > yc) & (y < yc + 32) & (sp > 0.3) & (sp < 0.8)
    # transverse processes taper laterally
    trans = (np.abs(y - yc + 3) < 4.0 - np.abs(x) / 16) & (np.abs(x) < 32) & (s > 0.4) & (s < 0.65)
    bone = body | arch | spinous | trans
    tis = np.where(
        disc & body, T.disc, np.where(~body, T.bone, np.where(qb < 1 - 1.5 / L.ryv, T.trabecular_bone, T.cortical_bone))
    )
    cv.paint(box, bone & (cv.depth[box] > 3), O.spine, tis)
    cv.paint(box, canal & (cv.depth[box] > 3), O.spine, T.csf)


def ribs(cv, L, rng):
    u = rng.uniform
    period, slope = u(24, 30), u(110, 150)
    box = cv.box((-250, -250, L.zR - 160), (250, 250, 400))
    Z = cv.Z[box]
    cos_t = cv.cos_t[box]
    theta = np.arccos(np.clip(cos_t, -1, 1))  # 0 posterior .. pi anterior
    band = (cv.depth[box] > L.fat * 0.9 + 1) & (cv.depth[box] < L.fat * 0.9 + 10)
    low = L.zR - 95 - 55 * (cos_t > 0) * cos_t  # lower ribs reach further down at the back
    phase = ((Z + slope * theta / np.pi) / period) % 1.0
    rib = band & (phase < 7.5 / period) & (theta > 0.5) & (theta < 2.5) & (Z > low)
    rib &= cv.organ[box] != O.spine
    cv.paint(box, rib, O.ribs, T.bone)
