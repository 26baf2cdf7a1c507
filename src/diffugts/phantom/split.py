"""The zero-shot split: which (modality, organ, lesion type) combinations training may see.

Trainable heads are trained on SEEN combinations only; everything else is held out for the
zero-shot benchmark, labelled with *why* it is unseen so results can be broken down:

- ``type``: a lesion appearance never shown in training (rim-enhancing necrotic, infiltrative,
  multifocal small lesions);
- ``organ``: an organ that never carried a lesion in training (pancreas, spleen);
- ``modality``: MR (T1-like and T2-like): training is CT only.

Healthy cases carry no lesions; CT healthy cases are usable for training, MR ones are not.
Documented in docs/phantoms.md; change it only together with that page.
"""

from __future__ import annotations

SEEN_MODALITIES = ("CT",)
SEEN_ORGANS = ("liver", "right kidney", "left kidney")
SEEN_TYPES = ("hypodense", "hyperenhancing", "cystic")

SEEN: frozenset[tuple[str, str, str]] = frozenset(
    (m, o, t) for m in SEEN_MODALITIES for o in SEEN_ORGANS for t in SEEN_TYPES
)


def unseen_reasons(modality: str, organ: str, lesion_type: str) -> list[str]:
    """Why a combination is held out: [] for a seen one, else a subset of type/organ/modality."""
    reasons = []
    if lesion_type not in SEEN_TYPES:
        reasons.append("type")
    if organ not in SEEN_ORGANS:
        reasons.append("organ")
    if modality not in SEEN_MODALITIES:
        reasons.append("modality")
    return reasons


def split_of(modality: str, organ: str, lesion_type: str) -> str:
    """'seen' or 'unseen' (``modality`` is "CT" or "MR")."""
    return "seen" if (modality, organ, lesion_type) in SEEN else "unseen"
