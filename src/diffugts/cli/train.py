"""`diffugts train`: the project's training recipes (the demo model, and each head alone)."""

from __future__ import annotations

from pathlib import Path

from diffugts.config import AOVA_HEAD, REFINE_HEAD

DEMO_CONFIGS = ("demo", "demo-2d")  # configurations with a training recipe


def register(sub) -> None:
    import argparse

    from diffugts.stages.verification import CANDIDATE_SOURCES, FEATURES, KNOWN_FEATURES
    from diffugts.train.recipe import DemoRecipe  # light: dataclasses only

    p = sub.add_parser("train", help="train the demo backbone, or the trainable heads on phantoms and real datasets")
    t = p.add_subparsers(dest="train_command", metavar="WHAT", required=True)

    b = t.add_parser("backbone", help="demo VAE + denoiser (healthy anatomy), 3D or 2D by --config")
    b.add_argument("--out", required=True, help="package folder to write")
    b.add_argument(
        "--config",
        default="demo",
        choices=DEMO_CONFIGS,
        help="backbone configuration: demo (3D MAISI-like, rectified flow) or demo-2d (diffusers 2D, "
        "captioned slices, DDPM)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--cases", type=int, default=48)
    b.add_argument("--vae-steps", type=int, default=1500)
    b.add_argument("--denoiser-steps", type=int, default=1500)
    b.set_defaults(func=_backbone)

    a = t.add_parser("aova", help="the anomaly-aware attention head, on seen lesion types only")
    a.add_argument("--model", required=True, help="package with a backbone")
    a.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--cases", type=int, default=60)
    a.add_argument("--steps", type=int, default=1200)
    a.add_argument("--dim", type=int, default=64)
    a.add_argument(
        "--synthetic-cases",
        type=int,
        default=0,
        help="extra healthy cases with generic synthetic anomalies painted into seen organs "
        "(default 0, as in the demo recipe)",
    )
    a.add_argument(
        "--randomised-cases",
        type=int,
        default=20,
        help="copies of seen cases with random per-tissue intensities (modality-robust grounding; "
        "default 20, as in the demo recipe)",
    )
    a.add_argument(
        "--mr-healthy-cases",
        type=int,
        default=8,
        help="lesion-free MR phantoms for region grounding (MR lesions stay unseen; default 8)",
    )
    a.add_argument(
        "--fusion-recall",
        type=float,
        default=0.85,
        help="fuse the coarse map with the organ-relative deviation, its threshold keeping this share "
        "of the training lesion voxels (default 0.85); 0: the head's own map, no fusion",
    )
    a.add_argument(
        "--fusion-margin-mm",
        type=float,
        default=DemoRecipe.fusion_margin_mm,
        help="the organ's border (mm) the fusion leaves unscored, where organ maps err "
        f"(default {DemoRecipe.fusion_margin_mm:g})",
    )
    a.add_argument(
        "--features",
        default=None,
        help="comma-separated backbone feature maps (default: the demo recipe's, or every scale but the "
        "finest for backbones without them)",
    )
    _dataset_args(a)
    a.set_defaults(func=_aova)

    o = t.add_parser(
        "organs", help="the organ grounding network (before `train aova`; refits an existing head's fusion)"
    )
    o.add_argument("--model", required=True, help="package with a backbone")
    o.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--cases", type=int, default=40, help="CT phantoms of seen types and lesion-free ones (default 40)")
    o.add_argument("--steps", type=int, default=DemoRecipe.organ_steps, help="(default %(default)s)")
    o.add_argument("--mr-healthy-cases", type=int, default=16, help="lesion-free MR phantoms (MR anatomy; default 16)")
    o.add_argument(
        "--claim-anatomy",
        action="store_true",
        default=DemoRecipe.organ_claim_anatomy,
        help="also label the vena cava and abdominal vessels, so that no organ map takes them in",
    )
    o.add_argument(
        "--anomaly-p",
        type=float,
        default=DemoRecipe.organ_anomaly_p,
        help="share of steps with generic lesions painted into the organs, labelled as the organ (default %(default)s)",
    )
    o.add_argument(
        "--fine-tune", action="store_true", help="start from the package's organ network instead of from scratch"
    )
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3; 1e-3 with --fine-tune)")
    _dataset_args(o, checkpoints=False)  # one short run: no resumable checkpoints (yet)
    o.set_defaults(func=_organs)

    m = t.add_parser(
        "normative", help="the normative model: healthy appearance per organ, from lesion-free phantoms (after organs)"
    )
    m.add_argument("--model", required=True, help="package with an organ network")
    m.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--cases", type=int, default=DemoRecipe.normative_cases, help="lesion-free CT phantoms")
    m.add_argument("--mr-cases", type=int, default=DemoRecipe.normative_mr_cases, help="lesion-free MR phantoms")
    m.add_argument(
        "--seed-log-odds",
        type=_optional_float,
        default=DemoRecipe.normative_seed_log_odds,
        help="candidates grow only from seeds where the organ network's log-odds exceed this; "
        "'none': from anywhere in the organ (default %(default)s)",
    )
    m.add_argument(
        "--seed-opening",
        choices=("volume", "slice"),
        default=DemoRecipe.normative_seed_opening,
        help="open the seeds with a cross in 3D, or within each slice, so that lesions on one or two "
        "slices seed (default %(default)s)",
    )
    m.add_argument(
        "--texture-mm",
        type=_scales,
        default=DemoRecipe.normative_texture_mm,
        help="scales (mm, comma-separated) of local standard deviation features; 'none': no texture "
        "features (default %(default)s)",
    )
    m.add_argument(
        "--shape",
        action=argparse.BooleanOptionalAction,
        default=DemoRecipe.normative_shape,
        help="local shape (Hessian eigenvalues) and depth among the features; --no-shape: organ-relative "
        "intensity and texture only (default %(default)s)",
    )
    m.add_argument(
        "--score",
        choices=("likelihood", "discriminative", "either"),  # diffugts.stages.normative.SCORES
        default=DemoRecipe.normative_score,
        help="how unlike healthy tissue a voxel is: its negative log-likelihood under the organ's mixture, "
        "the log-odds of an anomaly discriminator trained against generic synthetic anomalies painted into "
        "the same healthy phantoms, or either: the larger of the two, each relative to its healthy quantiles "
        "(default %(default)s)",
    )
    m.add_argument(
        "--reference",
        choices=("organ", "organ_map"),
        default=DemoRecipe.normative_reference,
        help="healthy reference voxels: those of the true organ, or every voxel the organ map grounds as the "
        "organ, as inference sees it (default %(default)s)",
    )
    m.add_argument(
        "--calibration-cases",
        type=int,
        default=DemoRecipe.normative_calibration_cases,
        help="more lesion-free phantoms per modality, never fitted on, whose healthy quantiles set the "
        "thresholds; 0: held-out voxels of the fitting cases (default %(default)s)",
    )
    m.add_argument(
        "--margin-mm",
        type=float,
        default=DemoRecipe.normative_margin_mm,
        help="organ border (mm) left unscored: no features, no candidates there; less for a thin organ, see "
        "--min-interior (default %(default)s)",
    )
    m.add_argument(
        "--min-interior",
        type=float,
        default=DemoRecipe.normative_min_interior,
        help="the least share of an organ left scored: where --margin-mm would leave less (a thin organ), the "
        "margin is halved, down to one voxel; 0: a fixed margin (default %(default)s)",
    )
    m.add_argument(
        "--organs",
        type=_families,
        default=None,
        help="refit only these organ families (comma-separated) and keep the package's fit of the others byte "
        "for byte; every other option must then be the package's own, and the border options must leave the "
        "kept organs' scored interiors as they are (default: all)",
    )
    m.add_argument(
        "--position",
        action=argparse.BooleanOptionalAction,
        default=DemoRecipe.normative_position,
        help="the voxel's place in its organ (0..1 along each axis of the organ's box) among the features, so "
        "that healthy anatomy where it always lies is normal (default %(default)s)",
    )
    m.add_argument(
        "--members",
        type=int,
        default=DemoRecipe.normative_members,
        help="discriminators per organ and modality, each fitted on lesion-free cases of its own; the score is "
        "their mean (--score discriminative; default %(default)s)",
    )
    m.add_argument(
        "--halo-mm",
        type=float,
        default=DemoRecipe.normative_halo_mm,
        help="the discriminator also learns the healthy voxels up to this far (mm) around its painted anomalies as "
        "healthy (--score discriminative; 0: none; default %(default)s)",
    )
    m.add_argument(
        "--grow-above",
        type=float,
        default=DemoRecipe.normative_grow_above,
        help="candidates grow through voxels above this, between the growing threshold (-1, the healthy "
        "95 %% quantile) and the seeds' (0) (default %(default)s)",
    )
    m.add_argument(
        "--grow-mm",
        type=_optional_float,
        default=DemoRecipe.normative_grow_mm,
        help="candidates grow at most this far (mm) from their seeds; 'none': through the whole component "
        "(default %(default)s)",
    )
    m.add_argument(
        "--delineate-above",
        type=_optional_float,
        default=DemoRecipe.normative_delineate_above,
        help="a verified candidate is reported as the part its seeds reach through voxels above this, "
        "between -1 and 0 as --grow-above; 'none': the whole candidate (default %(default)s)",
    )
    _delineation_options(m, "--delineate-level", "--delineate-expand-mm")
    m.set_defaults(func=_normative)

    dl = t.add_parser(
        "delineation",
        help="how a package's verified lesions are reported (delineation by level), without refitting anything",
    )
    dl.add_argument("--model", required=True, help="package with a normative model")
    dl.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    _delineation_options(dl, "--level", "--expand-mm")
    dl.set_defaults(func=_delineation)

    r = t.add_parser("refine", help="the residual refinement head, on seen lesion types only")
    r.add_argument("--model", required=True, help="package with a backbone and an AOVA head")
    r.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--cases", type=int, default=40)
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument(
        "--healthy-cases",
        type=int,
        default=12,
        help="lesion-free cases whose coarse candidates teach the head to answer 'nothing' (default 12)",
    )
    _dataset_args(r)
    r.set_defaults(func=_refine)

    v = t.add_parser(
        "verifier", help="the lesion verifier: keeps or drops each candidate lesion (after `train refine`)"
    )
    v.add_argument("--model", required=True, help="package with a fused AOVA head and a refinement head")
    v.add_argument("--out", default=None, help="write a new package here (default: update --model)")
    v.add_argument("--seed", type=int, default=0)
    for flag, default, what in (
        ("--cases", DemoRecipe.verifier_cases, "seen-type cases the refinement head never saw"),
        ("--healthy-cases", DemoRecipe.verifier_healthy_cases, "lesion-free cases"),
        ("--mr-healthy-cases", DemoRecipe.verifier_mr_healthy_cases, "lesion-free MR cases: false candidates only"),
        (
            "--anomaly-cases",
            DemoRecipe.verifier_anomaly_cases,
            "lesion-free CT cases with generic anomalies painted into their organs, counted as lesions",
        ),
        ("--anomaly-mr-cases", DemoRecipe.verifier_anomaly_mr_cases, "the same in MR"),
    ):
        v.add_argument(flag, type=int, default=default, help=f"{what} (default %(default)s)")
    v.add_argument(
        "--lookalike-cases",
        type=int,
        default=None,
        help="lesion-free CT and as many MR cases whose normative candidates make the look-alike atlas that the "
        f"lookalikes feature reads (default: {DemoRecipe.verifier_lookalike_cases} when --features has it, else none)",
    )
    v.add_argument(
        "--candidates",
        choices=CANDIDATE_SOURCES,
        default=DemoRecipe.verifier_candidates,
        help="what it verifies: components of the refinement head's mask, of the organ-relative deviation "
        f"|z| > --deviation-k, or the normative model's candidates (default {DemoRecipe.verifier_candidates})",
    )
    v.add_argument("--deviation-k", type=float, default=DemoRecipe.verifier_deviation_k, help="(default %(default)s)")
    v.add_argument(
        "--min-recall",
        type=_min_recall,
        default=DemoRecipe.verifier_min_recall,
        help="its threshold keeps at least this share (0-1] of the fitting cases' true candidates; "
        "'none': the best-Dice threshold (default %(default)s)",
    )
    v.add_argument(
        "--features",
        type=_verifier_features,
        default=DemoRecipe.verifier_features,
        help="comma-separated component features to weigh, of: "
        f"{', '.join(KNOWN_FEATURES)} (default: {', '.join(DemoRecipe.verifier_features or FEATURES)})",
    )
    v.add_argument(
        "--grow-mm",
        type=_optional_float,
        default=argparse.SUPPRESS,
        help="set how far the package's normative candidates grow from their seeds (mm; 'none': unlimited) and "
        "fit on them (default: as the package has it)",
    )
    v.set_defaults(func=_verifier)

    d = t.add_parser("demo", help="the whole demo model (what `make demo-model` runs)")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument(
        "--config",
        default="demo",
        choices=DEMO_CONFIGS,
        help="demo (3D, the shipped model) or demo-2d (the 2D diffusers family; docs/backbones-2d.md)",
    )
    d.add_argument("--quick", action="store_true", help="a few minutes, for smoke tests (not the shipped model)")
    d.add_argument(
        "--backbone",
        default=None,
        metavar="PACKAGE",
        help="reuse this package's trained backbone and train the heads only (the recipe's backbone "
        "stage is skipped; its provenance is kept)",
    )
    d.set_defaults(func=_demo)


def _backbone(args) -> int:
    from diffugts.train.run import train_backbone

    pkg = train_backbone(
        Path(args.out), args.config, args.seed, args.cases, args.vae_steps, args.denoiser_steps, not args.quiet
    )
    print(f"wrote {pkg.root}")
    return 0


def _dataset_args(p, checkpoints: bool = True) -> None:
    g = p.add_argument_group("real datasets (docs/datasets.md); phantoms still come from --cases (0: none)")
    g.add_argument(
        "--dataset",
        action="append",
        metavar="PATH",
        help="a dataset folder: MSD / nnU-Net v2 raw, KiTS23, or DICOM series + SEG (repeatable)",
    )
    g.add_argument(
        "--mapping",
        action="append",
        metavar="FILE",
        help="label mapping (a file or a shipped name, e.g. kits23): one for all --dataset or one each",
    )
    g.add_argument(
        "--organs",
        action="append",
        metavar="DIR",
        help="TotalSegmentator outputs for datasets without organ labels: one for all or one each ('-': none)",
    )
    g.add_argument(
        "--seen",
        action="append",
        metavar="TYPE",
        help="lesion types training may see (repeatable; default: the split file's seen_types)",
    )
    g.add_argument(
        "--protocol",
        metavar="SPLIT",
        help="a split file or 'paper-protocol': train on its training datasets under --data-root "
        "(instead of --dataset)",
    )
    g.add_argument("--data-root", default=".", help="where the split file's dataset paths start (default .)")
    g.add_argument(
        "--held-out-fraction",
        type=float,
        default=None,
        help="share of each dataset's cases held out to validate (default: the split file's, 0.2)",
    )
    g.add_argument(
        "--max-cases",
        type=int,
        default=None,
        help="at most N training cases per dataset (the training loops keep every case in memory; default: all)",
    )
    if checkpoints:
        g.add_argument(
            "--checkpoint-every",
            type=int,
            default=100,
            help="save the head every N steps into OUT/.checkpoints/ and resume from there after an "
            "interruption (default 100; 0: never)",
        )
    g.add_argument(
        "--device",
        default=None,
        help="where the frozen backbone runs (features, synthesis): cpu (default), cuda, auto; the "
        "small heads train on the CPU",
    )


def _source(args):
    """The datasets of the command line, or None (phantoms only)."""
    if args.dataset and args.protocol:
        from diffugts.errors import ConfigError

        raise ConfigError("--dataset and --protocol: give one or the other (the split file names its datasets)")
    if not args.dataset and not args.protocol:
        if args.mapping or args.organs:
            from diffugts.errors import ConfigError

            raise ConfigError("--mapping / --organs go with --dataset")
        return None
    from diffugts.datasets.run import protocol_source
    from diffugts.datasets.select import explicit, protocol_of
    from diffugts.datasets.training import DatasetSource
    from diffugts.errors import ConfigError

    if args.held_out_fraction is not None and not 0 <= args.held_out_fraction < 1:
        raise ConfigError(f"--held-out-fraction {args.held_out_fraction}: give a share in [0, 1)")
    if args.protocol:
        return protocol_source(
            args.protocol, args.data_root, args.seen, args.held_out_fraction, not args.quiet, args.max_cases
        )
    protocol = protocol_of(None)
    datasets = explicit(args.dataset, args.mapping, args.organs, args.seen or protocol.seen_types)
    fraction = protocol.held_out_fraction if args.held_out_fraction is None else args.held_out_fraction
    return DatasetSource(datasets, fraction, show_progress=not args.quiet, max_cases=args.max_cases)


def _checkpoint(args, head: str, source, settings: dict):
    """OUT/.checkpoints/<head>.pt (the model folder when it is updated in place)."""
    if not args.checkpoint_every or (not args.out and str(args.model).startswith("s3://")):
        return None
    from diffugts.datasets.run import training_checkpoint
    from diffugts.models.package import open_package

    root = Path(args.out) if args.out else open_package(args.model).root
    # A run with other steps does not resume (its head would not be what the manifest says).
    return training_checkpoint(
        root / ".checkpoints", head, args.model, {**settings, "steps": args.steps}, source, args.checkpoint_every
    )


def _device(args) -> str | None:
    if args.device in (None, "cpu"):
        return None
    from diffugts.utils.device import pick_device

    return str(pick_device(None if args.device == "auto" else args.device))


def _aova(args) -> int:
    from diffugts.train.run import train_aova_head

    features = [f.strip() for f in args.features.split(",") if f.strip()] if args.features else None
    source = _source(args)
    checkpoint = _checkpoint(
        args,
        AOVA_HEAD,
        source,
        {
            "seed": args.seed,
            "cases": args.cases,
            "dim": args.dim,
            "features": features,
            "synthetic_cases": args.synthetic_cases,
            "randomised_cases": args.randomised_cases,
            "mr_healthy_cases": args.mr_healthy_cases,
        },
    )
    pkg = train_aova_head(
        args.model,
        Path(args.out) if args.out else None,
        args.seed,
        args.cases,
        args.steps,
        args.dim,
        features,
        show_progress=not args.quiet,
        synthetic_cases=args.synthetic_cases,
        randomised_cases=args.randomised_cases,
        mr_healthy_cases=args.mr_healthy_cases,
        fusion_recall=args.fusion_recall or None,
        fusion_margin_mm=args.fusion_margin_mm,
        source=source,
        checkpoint=checkpoint,
        device=_device(args),
    )
    if checkpoint:
        checkpoint.remove()
    dice = pkg.manifest["provenance"]["aova_training"]["held_out_seen_dice"]
    print(f"wrote {pkg.root} (held-out seen Dice of the coarse map: {dice})")
    return 0


def _organs(args) -> int:
    from diffugts.train.run import train_organ_net

    pkg = train_organ_net(
        args.model,
        Path(args.out) if args.out else None,
        args.seed,
        args.cases,
        args.steps,
        args.mr_healthy_cases,
        show_progress=not args.quiet,
        source=_source(args),
        device=_device(args),
        claim_anatomy=args.claim_anatomy,
        anomaly_p=args.anomaly_p,
        fine_tune=args.fine_tune,
        lr=args.lr,
    )
    dice = pkg.manifest["provenance"]["organ_training"]["held_out_dice"]
    print(f"wrote {pkg.root} (held-out organ Dice: {', '.join(f'{k} {v}' for k, v in dice.items())})")
    return 0


def _delineation_options(parser, level_flag: str, expand_flag: str) -> None:
    """Delineation by level (NormativeParams.delineate_level, ``delineate_expand_mm``), as
    `train normative` and `train delineation` name it."""
    from diffugts.train.recipe import DemoRecipe

    parser.add_argument(
        level_flag,
        dest="delineate_level",
        metavar="FRACTION",
        type=_optional_float,
        default=DemoRecipe.normative_delineate_level,
        help="a verified candidate is reported as its voxels past this fraction of the way from its organ's "
        "intensity to its core's (0.5: half way); 'none': the whole candidate (default %(default)s)",
    )
    parser.add_argument(
        expand_flag,
        dest="delineate_expand_mm",
        metavar="MM",
        type=float,
        default=DemoRecipe.normative_delineate_expand_mm,
        help="how far past the candidate the delineation by level may reach (default %(default)s)",
    )


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _families(text: str) -> tuple[str, ...]:
    """'pancreas,spleen' -> ('pancreas', 'spleen'); train_normative checks the names."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _scales(text: str) -> tuple[float, ...]:
    """'2.5,5' -> (2.5, 5.0); 'none' -> (); checked as NormativeParams checks them."""
    import argparse

    from diffugts.stages.normative import NormativeParams

    if text.lower() == "none":
        return ()
    try:
        return NormativeParams(texture_mm=tuple(float(s) for s in text.split(","))).texture_mm
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None


def _normative(args) -> int:
    from diffugts.stages.normative import NormativeParams
    from diffugts.train.run import train_normative

    pkg = train_normative(
        args.model,
        Path(args.out) if args.out else None,
        args.seed,
        args.cases,
        args.mr_cases,
        not args.quiet,
        params=NormativeParams(
            seed_log_odds=args.seed_log_odds,
            seed_opening=args.seed_opening,
            texture_mm=args.texture_mm,
            shape=args.shape,
            score=args.score,
            reference=args.reference,
            margin_mm=args.margin_mm,
            min_interior=args.min_interior,
            position=args.position,
            members=args.members,
            halo_mm=args.halo_mm,
            grow_above=args.grow_above,
            grow_mm=args.grow_mm,
            delineate_above=args.delineate_above,
            delineate_level=args.delineate_level,
            delineate_expand_mm=args.delineate_expand_mm,
        ),
        calibration_cases=args.calibration_cases,
        organs=args.organs,
    )
    known = pkg.manifest["networks"]["normative"]["keys"]
    print(f"wrote {pkg.root} (normative model of {', '.join(known) or 'no organ'})")
    return 0


def _delineation(args) -> int:
    from diffugts.train.run import set_delineation

    pkg = set_delineation(
        args.model, Path(args.out) if args.out else None, args.delineate_level, args.delineate_expand_mm
    )
    params = pkg.network("normative")["params"]
    print(f"wrote {pkg.root} (delineation by level {params['delineate_level']}, {params['delineate_expand_mm']} mm)")
    return 0


def _refine(args) -> int:
    from diffugts.train.run import train_refine_head

    source = _source(args)
    checkpoint = _checkpoint(
        args, REFINE_HEAD, source, {"seed": args.seed, "cases": args.cases, "healthy_cases": args.healthy_cases}
    )
    pkg = train_refine_head(
        args.model,
        Path(args.out) if args.out else None,
        args.seed,
        args.cases,
        args.steps,
        show_progress=not args.quiet,
        healthy_cases=args.healthy_cases,
        source=source,
        checkpoint=checkpoint,
        device=_device(args),
    )
    if checkpoint:
        checkpoint.remove()
    dice = pkg.manifest["provenance"]["refine_training"]["held_out_seen_dice"]
    print(f"wrote {pkg.root} (held-out seen Dice of the refined mask: {dice})")
    return 0


def _min_recall(text: str) -> float | None:
    import argparse

    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a share in (0, 1], or none")
    return value


def _verifier_features(text: str) -> tuple[str, ...]:
    import argparse

    from diffugts.stages.verification import checked_features

    try:
        return checked_features(n.strip() for n in text.split(",") if n.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _verifier(args) -> int:
    from diffugts.train.recipe import DemoRecipe
    from diffugts.train.run import train_lesion_verifier

    pkg = train_lesion_verifier(
        args.model,
        Path(args.out) if args.out else None,
        args.seed,
        args.cases,
        args.healthy_cases,
        show_progress=not args.quiet,
        candidate_source=args.candidates,
        deviation_k=args.deviation_k,
        features=args.features,
        mr_healthy_cases=args.mr_healthy_cases,
        min_recall=args.min_recall,
        anomaly_cases=args.anomaly_cases,
        anomaly_mr_cases=args.anomaly_mr_cases,
        lookalike_cases=args.lookalike_cases
        if args.lookalike_cases is not None
        else DemoRecipe.verifier_lookalike_cases * ("lookalikes" in (args.features or ())),
        **({"grow_mm": args.grow_mm} if "grow_mm" in args else {}),
    )
    r = pkg.manifest["provenance"]["verifier_training"]
    if "not_fitted" in r:
        print(f"wrote {pkg.root} without a lesion verifier: {r['not_fitted']}")
        return 0
    print(
        f"wrote {pkg.root} (fitting cases: {r['kept_false_components']} of {r['components'] - r['lesion_components']} "
        f"false lesions kept, {r['kept_lesion_components']} of {r['lesion_components']} true; pooled Dice "
        f"{r['dice_before']} -> {r['dice_after']})"
    )
    return 0


def _demo(args) -> int:
    from diffugts.train.recipe import recipe_for
    from diffugts.train.run import train_demo

    recipe = recipe_for(args.config, args.quick, args.seed)
    pkg = train_demo(Path(args.out), recipe, show_progress=not args.quiet, backbone=args.backbone)
    print(f"wrote {pkg.root} in {pkg.manifest['provenance']['total_seconds']:.0f} s")
    return 0
