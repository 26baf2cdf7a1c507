"""The light configuration module: every default defined once, no torch, parameter errors that
the CLI turns into flags."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffugts.config import (
    DEFAULT_MIN_VOLUME_ML,
    DEFAULT_SEED,
    PIPELINE_MODEL_THRESHOLD,
    AttentionParams,
    MapMode,
    MethodParams,
    RefineParams,
    SynthesisParams,
    pipeline_threshold,
)
from diffugts.errors import ParameterError


def test_config_imports_no_torch():
    code = "import sys, diffugts.config, diffugts.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_map_mode_parses_its_values_and_names_the_choices():
    assert MapMode.parse("training-free") is MapMode.TRAINING_FREE and MapMode.AOVA == "aova"
    assert AttentionParams(maps="training-free").maps is MapMode.TRAINING_FREE
    with pytest.raises(ParameterError, match=r"unknown maps 'x' \(one of: aova, training-free\)"):
        AttentionParams(maps="x")


def test_parameter_errors_name_parameters_in_the_library_and_flags_in_the_cli(capsys):
    from diffugts.cli import main, message

    with pytest.raises(ParameterError) as err:
        SynthesisParams(strength=2.0).validate()
    assert str(err.value) == "synthesis: strength must be in (0, 1]"
    assert message(err.value) == "synthesis: --strength must be in (0, 1]"
    assert (
        main(
            [
                "segment",
                "x",
                "--out",
                "o",
                "--prompt",
                "p",
                "--maps",
                "aova",
                "--min-volume-ml",
                "0.1",
                "--model",
                "/nonexistent",
            ]
        )
        == 2
    )
    err_line = capsys.readouterr().err.strip().splitlines()
    assert len(err_line) == 1 and err_line[0].startswith("diffugts: error: ")


def test_library_cli_components_and_pipelines_share_the_defaults():
    import inspect

    from components.attend import attend
    from components.cohort import list_studies, segment_batch
    from components.refine import refine
    from components.segment import segment
    from diffugts.cli import build_parser
    from diffugts.runners.cohort import params_hash
    from pipelines.study import study_pipeline

    parser = build_parser()
    seg = parser.parse_args(["segment", "in", "--out", "o", "--prompt", "p"])
    ref = parser.parse_args(["refine", "s", "--attention", "a", "--synthesis", "y", "--out", "o"])
    att = parser.parse_args(["attend", "s", "--prompt", "p", "--out", "o"])
    assert seg.maps == att.maps == MapMode.AOVA and att.seed == DEFAULT_SEED
    assert ref.min_volume_ml == DEFAULT_MIN_VOLUME_ML
    # kfp components run from their own source, so their defaults are literals: they must agree.
    for component, names in (
        (attend, {"seed": DEFAULT_SEED, "maps": MapMode.AOVA}),
        (refine, {"min_volume_ml": DEFAULT_MIN_VOLUME_ML, "verifier_threshold": PIPELINE_MODEL_THRESHOLD}),
        (
            segment,
            {
                "min_volume_ml": DEFAULT_MIN_VOLUME_ML,
                "seed": DEFAULT_SEED,
                "maps": MapMode.AOVA,
                "verifier_threshold": PIPELINE_MODEL_THRESHOLD,
            },
        ),
        (list_studies, {"verifier_threshold": PIPELINE_MODEL_THRESHOLD}),
        (segment_batch, {"verifier_threshold": PIPELINE_MODEL_THRESHOLD}),
    ):
        inputs = component.component_spec.inputs
        for name, value in names.items():
            assert inputs[name].default == value, (component.name, name)
    assert study_pipeline.component_spec.inputs["min_volume_ml"].default == DEFAULT_MIN_VOLUME_ML
    assert study_pipeline.component_spec.inputs["verifier_threshold"].default == PIPELINE_MODEL_THRESHOLD
    assert seg.verifier_threshold is None and ref.verifier_threshold is None
    assert RefineParams().verifier_threshold is None
    hashed = inspect.signature(params_hash).parameters["maps"].default
    assert hashed == MapMode.AOVA
    assert (
        MethodParams().synthesis == SynthesisParams() and MethodParams().refine.min_volume_ml == DEFAULT_MIN_VOLUME_ML
    )


def test_the_verifiers_operating_point_is_checked_and_pipelines_say_model_own_below_0():
    assert RefineParams(verifier_threshold=0.0).verifier_threshold == 0.0
    assert RefineParams(verifier_threshold=1).verifier_threshold == 1
    for bad in (1.5, -0.1, float("nan"), "0.5"):
        with pytest.raises(ParameterError, match="verifier_threshold must lie in"):
            RefineParams(verifier_threshold=bad)
    assert pipeline_threshold(PIPELINE_MODEL_THRESHOLD) is None and pipeline_threshold(-0.001) is None
    assert pipeline_threshold(0.0) == 0.0 and pipeline_threshold(0.7) == 0.7
