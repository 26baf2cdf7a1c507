"""Coded concepts for the DICOM outputs: SNOMED CT (SCT), DICOM (DCM) and UCUM units.

Meanings are taken from pydicom's code dictionary where it has the concept, so they match
what viewers and validators expect.
"""

from __future__ import annotations

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

# Segment category / finding category (CID 7150) and type (CID 7151 / 7159).
MORPHOLOGICALLY_ABNORMAL = CodedConcept.from_code(codes.SCT.MorphologicallyAbnormalStructure)  # 49755003
NEOPLASM = CodedConcept("108369006", "SCT", "Neoplasm")
LESION = CodedConcept.from_code(codes.SCT.Lesion)  # 52988006
CYST = CodedConcept.from_code(codes.SCT.Cyst)  # 367643001

# Sites: the organ a prompt names (diffugts.networks.text.ORGAN_WORDS keys) -> SNOMED body structure.
_ORGAN_CODES = {
    "liver": codes.SCT.Liver,  # 10200004
    "kidney": codes.SCT.Kidney,  # 64033007
    "pancreas": codes.SCT.Pancreas,  # 15776009
    "spleen": codes.SCT.Spleen,  # 78961009
    "lung": codes.SCT.Lung,  # 39607008
    "colon": codes.SCT.Colon,  # 71854001
    "stomach": codes.SCT.Stomach,  # 69695003
    "adrenal gland": codes.SCT.AdrenalGland,  # 23451007
    "bladder": CodedConcept("89837001", "SCT", "Urinary bladder"),
    "prostate": codes.SCT.Prostate,  # 41216001
    "brain": codes.SCT.Brain,  # 12738006
    "bone": codes.SCT.Bone,  # 272673000
    "breast": codes.SCT.Breast,  # 76752008
    "lymph node": codes.SCT.LymphNode,  # 59441001
}

ALGORITHM_FAMILY = CodedConcept.from_code(codes.cid7162.ArtificialIntelligence)  # DCM 123110
PROCEDURE = CodedConcept.from_code(codes.SCT.ImagingProcedure)  # 363679005

# Measurements (TID 1419) and units (UCUM).
VOLUME = CodedConcept.from_code(codes.SCT.Volume)  # 118565006
LONG_AXIS = CodedConcept.from_code(codes.SCT.LongAxis)  # 103339001, RECIST's long axis
ATTENUATION = CodedConcept.from_code(codes.DCM.AttenuationCoefficient)  # 112031 (CT)
MR_SIGNAL = CodedConcept.from_code(codes.DCM.MRSignalIntensity)  # 110852 (MR)
MEAN = CodedConcept.from_code(codes.SCT.Mean)  # 373098007, the derivation
ML = CodedConcept("ml", "UCUM", "milliliter")
MM = CodedConcept("mm", "UCUM", "millimeter")
HU = CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = CodedConcept("1", "UCUM", "no units")
PRESENCE = CodedConcept.from_code(codes.DCM.PresenceOfProperty)  # 121052
ABSENT = CodedConcept.from_code(codes.DCM.Absent)  # 121054


def site_code(organ: str | None) -> CodedConcept | None:
    code = _ORGAN_CODES.get((organ or "").lower())
    if code is None:
        return None
    return code if isinstance(code, CodedConcept) else CodedConcept.from_code(code)


def finding_code(prompt_text: str) -> CodedConcept:
    """What the segment is: Neoplasm (the default, "liver tumor"), Cyst for cyst prompts,
    Lesion for prompts that name a lesion but no tumour ("hypodense liver lesion")."""
    low = prompt_text.lower()
    if "cyst" in low:
        return CYST
    if "lesion" in low and not any(w in low for w in _TUMOUR_WORDS):
        return LESION
    return NEOPLASM


_TUMOUR_WORDS = (
    "tumor",
    "tumour",
    "cancer",
    "carcinoma",
    "neoplasm",
    "metasta",
    "malignan",
    "glioma",
    "lymphoma",
    "sarcoma",
    "adenoma",
)
