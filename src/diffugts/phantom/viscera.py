"""Abdominal viscera: bowel, stomach, liver (+ gallbladder), spleen, pancreas, kidneys, vessels.

Same builder convention as ``body.py``; positions hang off the landmarks set there (diaphragm
domes, spine, cavity size), so relative anatomy holds while each seed varies.
"""

from __future__ import annotations

import numpy as np

from diffugts.phantom.grid import smooth_noise
from diffugts.phantom.labels import O, T
from diffugts.phantom.shapes import bbox, ellipsoid, rotation, tube

# --- bowel: colon frame plus small-bowel loops --------------------------------------------


def bowel(cv, L, rng):
    u = rng.uniform
    L.oral_contrast = bool(rng.random() < 0.3)
    zt = L.zR - 125
    xr, xl = L.xc - L.a * 0.62, L.xc + L.a * 0.62
    yf = L.yc - L.b_ant * 0.55
    colon = [
        (xr + u(-8, 8), L.y_sp - 25, -400),
        (xr, L.y_sp - 30, zt - 5),
        (xr + 25, yf, zt + 5),
        (L.xc, yf - 5, zt - u(0, 30)),
        (xl - 20, yf + 10, zt + 30),
        (xl, L.y_sp - 5, zt + 15),
        (xl + 5, L.y_sp - 15, -400),
    ]
    rc = u(17, 24)
    lo, hi = bbox(colon, rc, 0)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    q = tube(Z, Y, X, colon, rc)
    haustra = 1 + 0.12 * np.cos((Z + X) / 6.0)
    free = (cv.cav[box] > 1) & (Z < cv.zd(X, Y) - 3)
    m = cv.paint(box, (q * haustra < 1) & free, O.bowel, T.bowel_wall, over=[O.body])
    gas = smooth_noise(rng, Z.shape, 5.0 / np.asarray(cv.grid.spacing[::-1]))
    content = np.where(gas > -0.2, T.gas, T.stool)
    cv.paint(box, m & (q * haustra < 0.8), None, content)
    # small bowel: thresholded smooth field = loops packed in the mid/lower abdomen
    lo, hi = (L.xc - 120, L.yc - 140, -400), (L.xc + 120, L.y_sp - 15, zt + 30)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    sig = 6.0 / np.asarray(cv.grid.spacing[::-1])
    f = smooth_noise(rng, Z.shape, sig)
    g = smooth_noise(rng, Z.shape, sig * 1.5)
    top = (zt + 30 - Z) / 40.0  # loops thin out towards the upper abdomen
    f = f + np.clip(top, -2, 0.5) - 0.2
    free = (cv.cav[box] > 2) & (Z < cv.zd(X, Y) - 10) & (Y < L.y_sp - 15)
    m = cv.paint(box, (f > 0) & free, O.bowel, T.bowel_wall, over=[O.body])
    lumen = np.where(g > 1.1, T.gas, T.oral_contrast if L.oral_contrast else T.bowel_fluid)
    cv.paint(box, m & (f > 0.45), None, lumen)


def stomach(cv, L, rng):
    u = rng.uniform
    s = u(0.75, 1.15)  # distension
    pts = [
        (L.xc + 48, L.yc - 5, L.zL - 30),
        (L.xc + 45, L.yc - 15, L.zL - 60),
        (L.xc + 30, L.yc - L.b_ant * 0.5, L.zL - 92),
        (L.xc - 8, L.yc - L.b_ant * 0.55, L.zL - 100),
        (L.xc - 30, L.yc - 35, L.zL - 95),
    ]
    rad = np.array([36, 30, 24, 18, 10]) * s
    lo, hi = bbox(pts, rad, 0)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    q = tube(Z, Y, X, pts, rad)
    free = (cv.cav[box] > 1) & (Z < cv.zd(X, Y) - 1)
    m = cv.paint(box, (q < 1) & free, O.stomach, T.bowel_wall, over=[O.body, O.bowel])
    level = L.yc - u(0, 30)  # air-fluid level: gas rises anteriorly in a supine patient
    content = np.where(Y < level, T.gas, T.bowel_fluid)
    cv.paint(box, m & (q < 1 - 4.5 / rad.mean()), None, content)


# --- solid organs ------------------------------------------------------------------------


def liver(cv, L, rng):
    u = rng.uniform
    c = (L.xc - L.a_cav * 0.45 + u(-6, 6), L.yc - 5 + u(-8, 8), L.zR - 68 + u(-6, 6))
    r = (u(85, 100), u(90, 110), u(85, 100))
    lo, hi = bbox([c], max(r), 0)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    q = ellipsoid(Z, Y, X, c, r)
    # left-lobe edge: curved in the axial plane, retreating to the right further down
    dy = Y - L.yc
    left = L.xc + u(38, 55) - 0.45 * (dy + 70) - 0.004 * dy**2 - 0.9 * np.maximum(L.zR - 65 - Z, 0)
    inf = Z > L.zR - u(165, 185) + 0.4 * (X - L.xc + 100)  # edge rises medially
    # below the bare area the liver lies in front of the right kidney, not behind it
    lateral = 0.006 * np.maximum(L.xc - 40 - X, 0) ** 2  # laterally it wraps further back
    back = Y < np.maximum(L.y_sp + 60 - 0.9 * np.maximum(L.zR - 70 - Z, 0), L.y_sp - 20) + lateral
    m = (q < 1) & (X < left) & inf & back & (Z < cv.zd(X, Y) - 1) & (cv.cav[box] > 0)
    m = cv.paint(box, m, O.liver, T.liver)
    # hepatic / portal vessels: intersections of two level sets give tube-like curves
    sig = 11.0 / np.asarray(cv.grid.spacing[::-1])
    f1, f2 = smooth_noise(rng, Z.shape, sig), smooth_noise(rng, Z.shape, sig)
    # thicker towards the hilum / IVC (medial, posterior-superior), thin at the periphery
    hil = np.exp(-(((X - L.xc + 25) / 60) ** 2 + ((Z - L.zR + 60) / 70) ** 2))
    t = np.float32(0.13) + np.float32(0.17) * hil
    cv.paint(box, m & (np.abs(f1) < t) & (np.abs(f2) < t), None, T.portal_vessel)
    L.liver_x, L.liver_y, L.liver_z = c
    if rng.random() < 0.85:  # gallbladder (absent after cholecystectomy)
        g = (L.xc - u(30, 45), L.yc - L.b_ant * u(0.35, 0.5), L.zR - u(110, 125))
        gr = (u(14, 19), u(15, 20), u(30, 42))
        lo, hi = bbox([g], max(gr), 0)
        box = cv.box(lo, hi)
        Z, Y, X = cv.at(box)
        q = ellipsoid(Z, Y, X, g, gr, rotation(pitch=u(-30, -15), yaw=u(-20, 20)))
        m = cv.paint(box, (q < 1) & (cv.cav[box] > 1), O.gallbladder, T.bowel_wall, over=[O.body, O.liver, O.bowel])
        cv.paint(box, m & (q < 1 - 2.2 / min(gr)), None, T.bile)


def spleen(cv, L, rng):
    u = rng.uniform
    big = 1.3 if rng.random() < 0.08 else 1.0  # occasional splenomegaly
    c = (L.xc + L.a_cav * u(0.6, 0.68), L.yc + L.b_post * u(0.2, 0.35), L.zL - u(40, 55))
    r = np.array([u(45, 58), u(18, 24), u(38, 52)]) * big
    yaw = u(-70, -50)
    lo, hi = bbox([c], r.max(), 0)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    rot = rotation(yaw=yaw)
    q = ellipsoid(Z, Y, X, c, r, rot)
    v = rot[1]  # local v axis (lateral-posterior): the hilum faces the other way
    bite_c = np.asarray(c) - v * (r[1] + 24)
    bite = ellipsoid(Z, Y, X, bite_c, (r[0] * 0.7, r[1] + 12, r[2] * 0.7), rot)
    m = (q < 1) & (bite > 1) & (Z < cv.zd(X, Y) - 1) & (cv.cav[box] > 0)
    cv.paint(box, m, O.spleen, T.spleen)
    L.spleen_x, L.spleen_y, L.spleen_z = c


def pancreas(cv, L, rng):
    u = rng.uniform
    zp = L.zL - u(95, 110)
    L.z_pancreas = zp
    xs = np.linspace(-40, 82, 9)
    ys = L.y_sp - u(52, 58) + u(0.006, 0.008) * xs**2
    zs = zp + u(0.08, 0.18) * xs
    rs = u(10, 12) + 8 / (1 + np.exp((xs + 18) / 7))  # thick head, thin body/tail
    pts = np.stack([L.xc + xs, ys, zs], 1)
    pts[-1, 0] = min(pts[-1, 0], L.spleen_x - 15)
    lo, hi = bbox(pts, 30, 0)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    flat = np.float32(1.3)  # taller than thick: compress z so the round tube becomes oval
    q = tube(Z / flat, Y, X, pts / np.array([1, 1, flat]), rs)
    unc = ellipsoid(Z, Y, X, (L.xc - 30, L.y_sp - 45, zp - 18), (17, 15, 24))  # uncinate
    q = np.minimum(q, unc)
    cv.paint(box, (q < 1) & (cv.cav[box] > 1), O.pancreas, T.pancreas, over=[O.body, O.bowel, O.stomach, O.liver])
    # splenic vein along its back, portal confluence, SMV/SMA below
    L.portal = [(L.xc - 5, L.y_sp - 50, zp - 2), (L.xc - 32, L.yc - 18, zp + 28), (L.xc - 70, L.yc - 5, zp + 45)]
    veins = [
        pts[3:] + np.array([0, 11, 0]),
        L.portal,
        [(L.xc - 6, L.y_sp - 58, zp - 130), (L.xc - 5, L.y_sp - 50, zp - 2)],
    ]
    for line, rad in zip(veins, (4.5, 7.0, 5.5)):
        _vessel(cv, line, rad, O.abdominal_vessels, T.vein, over=[O.body, O.bowel, O.pancreas, O.stomach])
    sma = [(L.xc + 2, L.y_sp - 38, zp + 12), (L.xc + 2, L.y_sp - 55, zp - 10), (L.xc + 1, L.y_sp - 60, zp - 130)]
    _vessel(cv, sma, 3.5, O.abdominal_vessels, T.artery, over=[O.body, O.bowel, O.pancreas])


def _vessel(cv, pts, rad, label, tissue, over=None):
    lo, hi = bbox(pts, rad, 0)
    box = cv.box(lo, hi)
    if any(s.stop <= s.start for s in box):
        return
    Z, Y, X = cv.at(box)
    inside = (tube(Z, Y, X, pts, rad) < 1) & (cv.cav[box] > 0)
    cv.paint(box, inside, label, tissue, over=over)
    # inside the liver a vessel stays liver (as in liver ground truth), only its tissue changes
    cv.paint(box, inside & (cv.organ[box] == O.liver), None, tissue)


def kidneys(cv, L, rng):
    u = rng.uniform
    for side, label in ((-1, O.right_kidney), (1, O.left_kidney)):
        drop = u(10, 22) if side < 0 else 0.0  # the liver pushes the right kidney down
        c = (L.xc + side * u(62, 74), L.y_sp + u(0, 12), L.zL - u(100, 115) - drop)
        r = (u(23, 28), u(19, 24), u(48, 58))
        rot = rotation(yaw=-side * u(25, 45), pitch=side * u(8, 18))
        lo, hi = bbox([c], max(r), 0)
        box = cv.box(lo, hi)
        Z, Y, X = cv.at(box)
        q = ellipsoid(Z, Y, X, c, r, rot)
        med = rot[0] * -side  # local x axis turned towards the hilum (medial-anterior)
        hil = ellipsoid(Z, Y, X, np.asarray(c) + med * r[0] * 1.05, (r[0] * 0.5, r[1] * 0.55, r[2] * 0.4), rot)
        kid = (q < 1) & (hil > 1) & (cv.cav[box] > -2)
        sinus = ellipsoid(Z, Y, X, np.asarray(c) + med * r[0] * 0.45, (r[0] * 0.45, r[1] * 0.45, r[2] * 0.6), rot) < 1
        tis = np.where(q > 0.74, T.kidney_cortex, np.where(sinus, T.renal_sinus, T.kidney_medulla))
        cv.paint(box, kid, label, tis, over=[O.body, O.bowel, O.liver, O.spleen, O.muscle, O.stomach])
        hilum = np.asarray(c) + med * r[0] * 1.1
        ivc_x = L.xc - 22
        if side < 0:
            vein = [hilum, (ivc_x, L.y_sp - 30, c[2] + 20)]
        else:  # the left renal vein crosses in front of the aorta to the IVC
            vein = [hilum, (L.xc + 20, L.y_sp - 38, c[2] + 22), (ivc_x, L.y_sp - 40, c[2] + 22)]
        _vessel(cv, vein, 4.5, O.abdominal_vessels, T.vein, over=[O.body, O.bowel])
        setattr(L, f"kidney{'R' if side < 0 else 'L'}_z", c[2])


def great_vessels(cv, L, rng):
    u = rng.uniform
    ra = u(9, 12.5)
    L.z_bif = L.zL - u(195, 215)
    hiatus = L.zR - 30
    zs = np.linspace(-300, 300, 41)
    w = 1 / (1 + np.exp(-(zs - hiatus) / 25))  # 1 in the chest, 0 in the abdomen
    ax = L.xc + 10 + 10 * w
    ay = L.y_sp - L.ryv - ra - 3 + w * (L.ryv + ra - 6)  # chest: left of the spine
    keep = zs > L.z_bif
    pts = np.stack([ax, ay, zs], 1)[keep]
    _tube_organ(cv, pts, ra, O.aorta, T.artery)
    for s in (-1, 1):  # common iliac arteries below the bifurcation
        b = pts[0]
        il = [b, b + (s * 35, 5, -70), b + (s * 70, 15, -140)]
        _tube_organ(cv, il, ra * 0.65, O.aorta, T.artery)
    # IVC: right of the aorta, through the back of the liver into the right atrium
    ri = (u(11, 15), u(7, 10))
    zs = np.linspace(-300, 300, 41)
    up = 1 / (1 + np.exp(-(zs - L.zR + 35) / 20))
    ix = L.xc - 22 - 8 * up + 25 * np.clip((zs - L.zR - 10) / 40, 0, 1)
    iy = L.y_sp - L.ryv - 12 - 10 * up
    lo, hi = (ix.min() - 20, iy.min() - 20, -400), (ix.max() + 20, iy.max() + 20, 400)
    box = cv.box(lo, hi)
    Z, Y, X = cv.at(box)
    zi = np.clip((Z + 300) / 15, 0, 39.999)
    k = zi.astype(np.int32)
    t = zi - k
    cx = ix[k] * (1 - t) + ix[k + 1] * t
    cy = iy[k] * (1 - t) + iy[k + 1] * t
    m = (((X - cx) / ri[0]) ** 2 + ((Y - cy) / ri[1]) ** 2 < 1) & (cv.cav[box] > 0)
    m &= ~np.isin(cv.organ[box], [O.heart])
    cv.paint(box, m, O.inferior_vena_cava, T.vein)


def _tube_organ(cv, pts, rad, label, tissue):
    lo, hi = bbox(pts, rad, 0)
    box = cv.box(lo, hi)
    if any(s.stop <= s.start for s in box):
        return
    Z, Y, X = cv.at(box)
    m = (tube(Z, Y, X, pts, rad) < 1) & (cv.cav[box] > -5)
    cv.paint(box, m, label, tissue)
