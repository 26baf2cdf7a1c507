"""`diffugts evaluate`: the zero-shot benchmark on phantom cases or real datasets with ground truth."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    from diffugts.cli.segment import add_verifier_threshold

    p = sub.add_parser(
        "evaluate",
        help="Dice / NSD per lesion type, organ, modality, seen vs unseen, for four method variants "
        "and the organ-aware z baseline (+ normative for packages with a normative model, + training_free for "
        "2D diffusers packages)",
        description="Evaluate a model on phantom cases (folders written by `diffugts phantom`) or on real datasets "
        "(MSD / nnU-Net / KiTS23 / DICOM + SEG with a label mapping, docs/datasets.md): the "
        "intensity baseline, the coarse attention mask, coarse + synthesis residual without the head, and "
        "the full refined method; for a 2D diffusers package also the training-free cross-attention map "
        "(training_free). Writes OUT/evaluation.json and OUT/evaluation.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cases", help="folder of phantom case folders (with case.json)")
    src.add_argument(
        "--dataset",
        action="append",
        metavar="PATH",
        help="a dataset folder (repeatable; layouts: docs/datasets.md); needs --mapping",
    )
    src.add_argument(
        "--protocol",
        metavar="SPLIT",
        help="a split file (or 'paper-protocol'): its evaluation datasets and the held-out cases of its "
        "training datasets, under --data-root",
    )
    p.add_argument(
        "--mapping",
        action="append",
        metavar="FILE",
        help="label mapping per --dataset (a file or a shipped name such as msd-task03-liver); one for all or one each",
    )
    p.add_argument(
        "--organs",
        action="append",
        metavar="DIR",
        help="TotalSegmentator outputs per --dataset ('-' for none); one for all or one each",
    )
    p.add_argument(
        "--seen",
        action="append",
        metavar="TYPE",
        help="lesion types the model was trained on (repeatable; default: those its manifest records, "
        "else the paper protocol's)",
    )
    p.add_argument("--data-root", default=".", help="where --protocol's dataset paths start (default .)")
    p.add_argument("--model", default=None, help="model package folder, s3:// prefix, or demo (default) / demo-2d")
    p.add_argument(
        "--prompt",
        default="{organ} tumor",
        help="prompt template; {organ} is replaced by each lesion-bearing organ (default '{organ} tumor')",
    )
    add_verifier_threshold(p)  # the full method's
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from diffugts.models.defaults import default_model
    from diffugts.runners.evaluate import evaluate, markdown, write

    model = args.model or default_model()
    if args.cases:
        result = evaluate(
            args.cases,
            model,
            prompt_template=args.prompt,
            device=args.device,
            show_progress=not args.quiet,
            verifier_threshold=args.verifier_threshold,
        )
    else:
        result = _evaluate_datasets(args, model)
    write(result, Path(args.out))
    print(markdown(result))
    return 0


def _evaluate_datasets(args, model: str) -> dict:
    from diffugts.datasets.run import evaluate_protocol, evaluate_sets, trained_types
    from diffugts.datasets.select import explicit, protocol_of

    kw = {
        "prompt_template": args.prompt,
        "device": args.device,
        "show_progress": not args.quiet,
        "verifier_threshold": args.verifier_threshold,
    }
    if args.protocol:
        return evaluate_protocol(model, args.protocol, args.data_root, **kw)
    seen = args.seen or trained_types(model) or protocol_of(None).seen_types
    return evaluate_sets(
        model, [("evaluate", d) for d in explicit(args.dataset, args.mapping, args.organs, seen)], **kw
    )
