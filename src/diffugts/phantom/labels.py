"""Names of things: the organs of the ground truth and the tissue classes used for rendering."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace


@dataclass(frozen=True)
class Organ:
    label: int
    name: str
    family: str  # word used in prompts ("kidney" for both kidneys)
    adjective: str  # "hepatic", "renal", ... for prompts


ORGANS: tuple[Organ, ...] = (
    Organ(1, "body", "body", "visceral"),
    Organ(2, "subcutaneous fat", "fat", "subcutaneous"),
    Organ(3, "muscle", "muscle", "muscular"),
    Organ(4, "liver", "liver", "hepatic"),
    Organ(5, "spleen", "spleen", "splenic"),
    Organ(6, "right kidney", "kidney", "renal"),
    Organ(7, "left kidney", "kidney", "renal"),
    Organ(8, "pancreas", "pancreas", "pancreatic"),
    Organ(9, "aorta", "aorta", "aortic"),
    Organ(10, "inferior vena cava", "vena cava", "caval"),
    Organ(11, "spine", "vertebra", "vertebral"),
    Organ(12, "ribs", "rib", "costal"),
    Organ(13, "bowel", "bowel", "bowel"),
    Organ(14, "stomach", "stomach", "gastric"),
    Organ(15, "gallbladder", "gallbladder", "gallbladder"),
    Organ(16, "right lung", "lung", "pulmonary"),
    Organ(17, "left lung", "lung", "pulmonary"),
    Organ(18, "heart", "heart", "cardiac"),
    Organ(19, "abdominal vessels", "vessel", "vascular"),
)
ORGAN_BY_NAME = {o.name: o for o in ORGANS}
# O.liver, T.skin: the phantom modules' short names for label values.
O = SimpleNamespace(**{o.name.replace(" ", "_"): o.label for o in ORGANS})  # noqa: E741

TISSUES: tuple[str, ...] = (
    "air",
    "skin",
    "subcutaneous_fat",
    "visceral_fat",
    "muscle",
    "liver",
    "portal_vessel",
    "spleen",
    "kidney_cortex",
    "kidney_medulla",
    "renal_sinus",
    "pancreas",
    "artery",
    "vein",
    "trabecular_bone",
    "cortical_bone",
    "disc",
    "csf",
    "bowel_wall",
    "bowel_fluid",
    "gas",
    "stool",
    "oral_contrast",
    "lung",
    "lung_vessel",
    "blood_pool",
    "myocardium",
    "bile",
    "bone",
)
T = SimpleNamespace(**{name: i for i, name in enumerate(TISSUES)})
