"""`diffugts phantom`: generate the demo world (procedural CT/MR cases with ground truth).

Arguments are taken as strings and validated here, so every bad value is one
:class:`~diffugts.errors.ConfigError` line (exit 2) rather than an argparse usage dump.
"""

from __future__ import annotations

from diffugts.errors import ConfigError

MR_CONTRASTS = ("alternate", "t1", "t2")


def register(sub) -> None:
    p = sub.add_parser(
        "phantom",
        help="generate procedural CT/MR phantom cases (DICOM + NIfTI + ground truth)",
        description="Generate N phantom cases: a DICOM series, the NIfTI volume, organ and "
        "lesion label maps and case.json per case. The same --seed and case index always "
        "give the same patient (in CT and MR, with or without --healthy).",
    )
    p.add_argument("--n", default="1", help="number of cases (default 1)")
    p.add_argument("--seed", default="0", help="cohort seed, a non-negative integer")
    p.add_argument("--out", help="output folder (one sub-folder per case)")
    p.add_argument("--modality", default="ct", help="ct or mr (default ct)")
    p.add_argument(
        "--mr-contrast", default="alternate", help="t1, t2 or alternate (default: even case index T1, odd T2)"
    )
    p.add_argument("--lesions", default=None, help="comma-separated lesion types to draw from (default: all)")
    p.add_argument(
        "--organs", default=None, help="comma-separated host organs, e.g. 'liver,left_kidney' (default: all)"
    )
    p.add_argument("--split", default="any", help="draw only 'seen' or 'unseen' combinations, or 'any' (default)")
    p.add_argument("--healthy", action="store_true", help="no lesions at all")
    p.add_argument(
        "--healthy-fraction", default="0.15", help="share of lesion-free cases when not --healthy (default 0.15)"
    )
    p.add_argument("--start-index", default="0", help="index of the first case (default 0)")
    p.add_argument("--shape", default=None, help="grid size as NXxNYxNZ (default 128x128x64)")
    p.add_argument("--spacing", default=None, help="voxel size in mm as DX,DY,DZ (default 2.75,2.75,4)")
    p.add_argument("--no-dicom", action="store_true", help="write NIfTI + JSON only")
    p.add_argument(
        "--montage", default=None, metavar="PNG", help="also write the overview montage (CT and MR, every lesion type)"
    )
    p.set_defaults(func=_run)


def _int(name, text, lo, hi):
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name}: not an integer: {text!r}") from None
    if not lo <= v <= hi:
        raise ConfigError(f"--{name}: {v} is outside {lo}..{hi}")
    return v


def _choice(name, text, options):
    v = str(text).strip().lower()
    if v not in options:
        raise ConfigError(f"--{name}: {text!r} is not one of {', '.join(options)}")
    return v


def _list(name, text, options):
    if text is None:
        return None
    items = [t.strip().lower().replace("_", " ").replace("-", " ") for t in text.split(",")]
    items = [t for t in items if t]
    norm = {o.replace("_", " "): o for o in options}
    bad = [t for t in items if t not in norm]
    if bad or not items:
        raise ConfigError(
            f"--{name}: unknown {', '.join(map(repr, bad)) or 'empty list'}; choose from {', '.join(options)}"
        )
    return tuple(dict.fromkeys(norm[t] for t in items))


def _triple(name, text, cast, sep):
    try:
        v = tuple(cast(t) for t in text.lower().split(sep))
    except ValueError:
        v = ()
    if len(v) != 3 or any(x <= 0 for x in v):
        raise ConfigError(
            f"--{name}: expected three positive numbers like "
            f"{'128x128x64' if sep == 'x' else '2.75,2.75,4'}, got {text!r}"
        )
    return v


def build_specs(args):
    from diffugts.phantom.case import DEFAULT_SHAPE, DEFAULT_SPACING, CaseSpec, allowed_combinations
    from diffugts.phantom.lesions import HOST_ORGANS, LESION_TYPES

    n = _int("n", args.n, 1, 100_000)
    seed = _int("seed", args.seed, 0, 2**32 - 1)
    start = _int("start-index", args.start_index, 0, 10**6)
    modality = _choice("modality", args.modality, ("ct", "mr")).upper()
    contrast = _choice("mr-contrast", args.mr_contrast, MR_CONTRASTS)
    split = _choice("split", args.split, ("any", "seen", "unseen"))
    types = _list("lesions", args.lesions, tuple(LESION_TYPES))
    organs = _list("organs", args.organs, HOST_ORGANS)
    try:
        frac = float(args.healthy_fraction)
    except ValueError:
        frac = -1.0
    if not 0.0 <= frac <= 1.0:
        raise ConfigError(f"--healthy-fraction: expected a number in 0..1, got {args.healthy_fraction!r}")
    shape = DEFAULT_SHAPE
    if args.shape:
        nx, ny, nz = _triple("shape", args.shape, int, "x")
        if min(nx, ny, nz) < 16 or nx * ny * nz > 512 * 512 * 512:
            raise ConfigError(f"--shape: {args.shape} must be at least 16 and at most 512 voxels per side")
        shape = (nz, ny, nx)
    spacing = _triple("spacing", args.spacing, float, ",") if args.spacing else DEFAULT_SPACING
    specs = []
    for i in range(start, start + n):
        mr = None
        if modality == "MR":
            mr = {"t1": "T1", "t2": "T2"}.get(contrast) or ("T1" if i % 2 == 0 else "T2")
        specs.append(
            CaseSpec(
                seed=seed,
                index=i,
                modality=modality,
                mr_contrast=mr,
                lesion_types=types,
                organs=organs,
                split=split,
                healthy=args.healthy,
                healthy_fraction=frac,
                shape=shape,
                spacing=spacing,
            )
        )
    if not args.healthy and frac < 1.0 and not allowed_combinations(specs[0]):
        hint = " (MR is unseen entirely)" if modality == "MR" and split == "seen" else ""
        raise ConfigError(
            f"no lesion type / organ combination matches --lesions, --organs and --split{hint}; see docs/phantoms.md"
        )
    return specs


def _run(args) -> int:
    from pathlib import Path

    if not args.out and not args.montage:
        raise ConfigError("--out is required (or give --montage PNG)")
    specs = build_specs(args)
    if args.montage:
        from diffugts.phantom.montage import write_montage

        write_montage(Path(args.montage), seed=specs[0].seed)
        print(f"wrote {args.montage}")
    if not args.out:
        return 0
    from diffugts.phantom.cohort import generate_cohort
    from diffugts.utils.progress import progress

    out = Path(args.out)
    paths = generate_cohort(
        specs, out, dicom=not args.no_dicom, progress=lambda it: progress(it, "phantom", "case", enable=not args.quiet)
    )
    print(f"wrote {len(paths)} phantom case(s) to {out}")
    return 0
