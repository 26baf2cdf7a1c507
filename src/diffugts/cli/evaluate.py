"""`diffugts evaluate`: the zero-shot benchmark on phantom cases with ground truth."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="Dice / NSD per lesion type, organ, modality, seen vs unseen, for four method variants "
        "(five for 2D diffusers packages: + training_free)",
        description="Evaluate a model on phantom cases (folders written by `diffugts phantom`): the "
        "intensity baseline, the coarse attention mask, coarse + synthesis residual without the head, and "
        "the full refined method; for a 2D diffusers package also the training-free cross-attention map "
        "(training_free). Writes OUT/evaluation.json and OUT/evaluation.md.",
    )
    p.add_argument("--cases", required=True, help="folder of phantom case folders (with case.json)")
    p.add_argument("--model", default=None, help="model package folder, s3:// prefix, or demo (default) / demo-2d")
    p.add_argument("--prompt", default="{organ} tumor",
                   help="prompt template; {organ} is replaced by each lesion-bearing organ (default '{organ} tumor')")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from diffugts.evaluate import evaluate, markdown, write
    from diffugts.models.defaults import default_model

    result = evaluate(args.cases, args.model or default_model(), prompt_template=args.prompt, device=args.device,
                      show_progress=not args.quiet)
    write(result, Path(args.out))
    print(markdown(result))
    return 0
