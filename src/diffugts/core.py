"""The method in memory: one object per model package.

:class:`Core` opens the package (checksums verified once), loads the frozen backbone, the two
heads and the text encoder once, on first use, and runs the three model stages on a study held
in memory. :meth:`Core.prepare` puts a study on the model grid once (normalised, resampled), and
``attend``, ``synthesize`` and ``refine`` pass in-memory artifacts (diffugts.artifacts) from
one to the next. The file-based stages (``diffugts attend`` ...), ``diffugts segment``, the
pipelines' tasks, cohort batches and ``evaluate`` are short wrappers around it.

    core = Core("demo")
    study = core.prepare(load_study("out/study"))   # or Study.from_image(sitk.ReadImage(...), "CT")
    attention = core.attend(study, ["liver tumor"])
    synthesis = core.synthesize(study, attention)
    lesions = core.refine(study, attention, synthesis)
    # or all three at once: core.run(study, ["liver tumor"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from diffugts.artifacts.attention import Attention
from diffugts.artifacts.lesions import Lesions
from diffugts.artifacts.study import Study
from diffugts.artifacts.synthesis import Synthesis
from diffugts.config import AOVA_HEAD, NO_VERIFIER, REFINE_HEAD, MapMode, MethodParams
from diffugts.errors import ConfigError
from diffugts.models.package import open_package
from diffugts.stages.preprocess import Preprocessing
from diffugts.stages.verification import verifier_of


@dataclass
class PreparedStudy:
    """A study and what every stage derives from it once: the normalised volume on the model
    grid with the :class:`~diffugts.stages.preprocess.ModelSpace` to map back, and the body."""

    study: Study
    core: Core = field(repr=False)

    @cached_property
    def model_grid(self):
        """(x, space): the volume on the model grid, made once (on the backbone's resampling
        device, so the backbone is loaded first)."""
        from diffugts.stages.preprocess import to_model

        s = self.study
        return to_model(s.volume, s.geometry, s.modality, self.core.prep, device=self.core.backbone.resample_device)

    @property
    def x(self) -> np.ndarray:
        return self.model_grid[0]

    @property
    def space(self):
        return self.model_grid[1]

    @cached_property
    def body(self) -> np.ndarray:
        from diffugts.stages.refine import body_mask

        return body_mask(self.study.volume, self.study.modality)


@dataclass
class StudyResult:
    attention: Attention
    synthesis: Synthesis
    lesions: Lesions  # per prompt its mask (``masks``), the instances and their measurements


class Core:
    """A model package's networks, loaded once, and the method's stages on in-memory studies.

    ``verify`` False: the package's checksums are not checked (for a run that reads no weights,
    e.g. synthesis of an empty mask). ``backbone`` / ``refine_head``: already loaded networks
    to use instead of the package's (tests, benchmarks, training)."""

    def __init__(
        self,
        model: str,
        device=None,
        params: MethodParams | None = None,
        *,
        verify: bool = True,
        backbone=None,
        refine_head=None,
    ):
        params = params or MethodParams()
        params.synthesis.validate()
        self.params = params
        self.package = open_package(model, verify=verify)
        if params.refine.verifier_threshold is not None and not (
            self.package.has(REFINE_HEAD) and verifier_of(self.package) is not None
        ):
            raise ConfigError(NO_VERIFIER.format(model=model))
        self.prep = Preprocessing.from_dict(self.package.manifest["preprocessing"])
        self._device = device
        if backbone is not None:
            self.backbone = backbone
        if refine_head is not None:
            self.refine_head = refine_head

    # --- the networks, each loaded on first use -------------------------------------------------
    @cached_property
    def device(self):
        import torch

        from diffugts.utils.device import pick_device

        if "backbone" in self.__dict__:  # an injected backbone decides
            return next(self.backbone.parameters()).device
        return self._device if isinstance(self._device, torch.device) else pick_device(self._device)

    @cached_property
    def backbone(self):
        from diffugts.networks.backbones import load_backbone

        return load_backbone(self.package, self.device)

    @cached_property
    def aova_head(self):
        from diffugts.networks.aova import AOVAHead
        from diffugts.networks.loading import load_head

        return load_head(self.package, AOVA_HEAD, AOVAHead).to(self.device)

    @cached_property
    def refine_head(self):
        from diffugts.networks.loading import load_head
        from diffugts.networks.refine import RefineHead

        return load_head(self.package, REFINE_HEAD, RefineHead).to(self.device)

    @cached_property
    def organ_net(self):
        """The package's organ grounding network (diffugts.networks.organs), None if it has none."""
        from diffugts.networks.organs import load_organ_net

        net = load_organ_net(self.package)
        return net.to(self.device) if net is not None else None

    @cached_property
    def text(self):
        from diffugts.networks.text import TextEncoder
        from diffugts.stages.attend import text_encoder_path

        return TextEncoder(text_encoder_path(self.package), device=self.device)

    @cached_property
    def method(self):
        """What the attention stage reads (diffugts.stages.attend.Method)."""
        from diffugts.stages.attend import Method

        head = self.aova_head if self.params.attention.maps == MapMode.AOVA else None
        return Method(self.package, self.backbone, head, self.text, self.prep, self.device, self.organ_net)

    def load(self) -> Core:
        """Load every network the three stages need now, so a package that cannot do what was
        asked fails before any study is touched."""
        from diffugts.stages.attend import check_training_free

        method = self.method
        if self.params.attention.maps == MapMode.TRAINING_FREE:
            check_training_free(method)
        _ = self.refine_head
        return self

    # --- the stages ---------------------------------------------------------------------------
    def prepare(self, study: Study) -> PreparedStudy:
        return PreparedStudy(study, self)

    def attend(self, study: PreparedStudy, prompts) -> Attention:
        """Stage 2: per prompt (text, or a :class:`~diffugts.networks.text.Target`) its coarse
        map, mask and organ on the study grid."""
        from diffugts.stages.attend import attention

        return attention(self.method, study.study, study.x, study.space, prompts, self.params.attention)

    def synthesize(
        self,
        study: PreparedStudy,
        region: Attention | np.ndarray,
        *,
        source=None,
        ground_truth=None,
        show_progress: bool = False,
    ) -> Synthesis:
        """Stage 3: the pseudo-healthy study, inpainting ``region`` (an attention's union of
        coarse masks, or a mask on the study grid)."""
        from diffugts.stages.synthesize import synthesis

        return synthesis(self, study, region, source=source, ground_truth=ground_truth, show_progress=show_progress)

    def run(self, study: Study | PreparedStudy, prompts) -> StudyResult:
        """The three model stages on one study, in memory."""
        prepared = study if isinstance(study, PreparedStudy) else self.prepare(study)
        attention = self.attend(prepared, prompts)
        synthesis = self.synthesize(prepared, attention)
        return StudyResult(attention, synthesis, self.refine(prepared, attention, synthesis))

    def refine(self, study: PreparedStudy, attention: Attention, synthesis: Synthesis) -> Lesions:
        """Stage 4: refined masks and measured lesion instances per prompt."""
        from diffugts.stages.refine import refinement

        return refinement(self, study, attention, synthesis)
