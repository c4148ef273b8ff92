"""The text of the phantoms: organ-wise report sentences and the impression from the stated
findings (``write_text``), the clinical / technique / patient fields (``report_fields``), and the
rows of the CT-RATE report, label and metadata CSVs and the findings bank (``csv_rows``)."""

from __future__ import annotations

import numpy as np

from sigvlp.data.organs import ORGAN_GROUPS
from sigvlp.demo.synth.canvas import Scene
from sigvlp.demo.synth.config import RESCALE_INTERCEPT, RESCALE_SLOPE

__all__ = ["CLINICAL", "FINDING_TEXT", "NORMAL_SENTENCES", "csv_rows", "report_fields", "write_text"]

NORMAL_SENTENCES = {
    "trachea": ["Trachea and both main bronchi are in normal width and open.", "Trachea and main bronchi are patent."],
    "esophagus": ["Esophagus is of normal calibre.", "No wall thickening is seen in the esophagus."],
    "heart": ["Heart size is normal. There is no pericardial effusion.",
              "Heart contour and size are normal; no pericardial effusion or thickening."],
    "aorta": ["Thoracic aorta diameter is normal.", "The calibre of the thoracic aorta is normal."],
    "lung": ["Both lungs are normally aerated; no nodule, mass or infiltrate.",
             "No mass or infiltrative lesion is seen in either lung.", "Lung parenchyma is normal."],
    "liver": ["The liver is normal in size and density in the sections included.", "The liver is unremarkable."],
    "spleen": ["The spleen is of normal size.", "The spleen is unremarkable."],
    "stomach": ["No pathology is seen in the stomach within the sections."],
    "kidney": ["The upper poles of both kidneys are unremarkable."],
    "spine": ["Vertebral alignment is normal; no lytic or destructive lesion.",
              "Thoracic vertebrae are of normal height and alignment."],
    "ribs": ["No rib fracture is seen.", "Ribs are intact."],
    "sternum": ["The sternum is intact."],
}
CLINICAL = ["Not given.", "Cough.", "Shortness of breath.", "Follow-up of a pulmonary nodule.", "Fever and cough.",
            "Chest pain.", "Screening."]


#: stated finding -> ((organ, sentence), ...) and its impression, in the order a report states them;
#: both are formatted with the finding's parameters (sigvlp.demo.synth.lesions), once per instance
FINDING_TEXT = (
    ("Medical material", (("heart", "A cardiac pacemaker is present with its lead ending in the right heart."),),
     "Cardiac pacemaker."),
    ("Cardiomegaly", (("heart", "The heart is enlarged, with a cardiothoracic ratio of about {ctr:.2f}."),),
     "Cardiomegaly."),
    ("Pericardial effusion", (("heart", "Pericardial effusion up to {thickness_mm} mm thick is present."),),
     "Pericardial effusion."),
    ("Coronary artery wall calcification",
     (("heart", "Calcified atherosclerotic plaques are seen in the coronary arteries."),),
     "Coronary artery calcification."),
    ("Arterial wall calcification",
     (("aorta", "Atherosclerotic calcified plaques are seen in the wall of the thoracic aorta."),),
     "Aortic atherosclerosis."),
    ("Hiatal hernia", (("esophagus", "A hiatal hernia is present at the lower end of the esophagus."),
                       ("stomach", "Part of the stomach has herniated through the hiatus, about {size_mm} mm.")),
     "Hiatal hernia."),
    ("Emphysema", (("lung", "Centrilobular emphysematous changes are seen in both upper lobes."),), "Emphysema."),
    ("Lung nodule", (("lung", "A {diameter_mm} mm solid nodule is seen in the {lobe}."),), "Pulmonary nodule(s)."),
    ("Lung opacity", (("lung", "Ground-glass opacity is seen in the {lobe}."),), "Ground-glass opacity."),
    ("Consolidation", (("lung", "Consolidation is seen in the {lobe}."),), "Consolidation."),
    ("Atelectasis", (("lung", "Subsegmental atelectasis is seen in the {lobe}."),), "Atelectasis."),
    ("Pleural effusion", (("lung", "{Side} pleural effusion up to {depth_mm} mm thick is present."),),
     "{Side} pleural effusion."),
)


def _instances(name: str, params: dict) -> list[dict]:
    """The parameter sets a stated finding's sentences are formatted with: one per lung nodule, the
    side capitalised for a pleural effusion, else the finding's parameters."""
    if name == "Lung nodule":
        return params["nodules"]
    if name == "Pleural effusion":
        return [{**params, "Side": params["side"].capitalize()}]
    return [params]


def write_text(stated: dict, labels: np.ndarray, rng) -> tuple[dict[str, list[str]], str]:
    """(organ -> sentences, impression) of a phantom: an abnormal sentence per stated finding (with
    its parameters), a normal sentence (drawn from NORMAL_SENTENCES with `rng`) for every other organ
    present in `labels`; organs are sigvlp.data.organs.ORGAN_GROUPS keys."""
    present_ids = set(np.unique(labels).tolist())
    organs = [o for o, ids in ORGAN_GROUPS.items() if present_ids & set(ids)]
    out: dict[str, list[str]] = {o: [] for o in organs}
    short = []
    for name, sentences, summary in FINDING_TEXT:
        if name not in stated:
            continue
        instances = _instances(name, stated[name])
        for params in instances:
            for organ, template in sentences:
                out.setdefault(organ, []).append(template.format(**params))
        short.append(summary.format(**(instances[-1] if instances else {})))
    for organ in organs:  # an organ without an abnormal sentence gets a normal one
        if not out.get(organ):
            variants = NORMAL_SENTENCES.get(organ)
            if variants:
                out[organ] = [str(variants[int(rng.integers(len(variants)))])]
    impression = " ".join(short) if short else "No significant abnormality in the chest."
    return {o: s for o, s in out.items() if s}, impression


def report_fields(sc: Scene) -> dict:
    """The Phantom fields a report states (findings, organ_sentences, impression, clinical, technique,
    patient) of a drawn scene; wording draws from sc.trng, patient fields from sc.rng."""
    rng, trng, stated, sz = sc.rng, sc.trng, sc.stated, sc.sz
    sentences, impression = write_text(stated, sc.labels, trng)
    age = int(rng.integers(25, 90))
    clinical = str(trng.choice(CLINICAL))
    technique = f"Non-contrast chest CT was obtained in the axial plane with {sz:g} mm slice thickness."
    patient = {"PatientSex": str(rng.choice(["M", "F"])), "PatientAge": f"{age:03d}Y",
               "Manufacturer": str(rng.choice(["SIEMENS", "PHILIPS", "GE MEDICAL SYSTEMS", "TOSHIBA"]))}
    return dict(findings=stated, organ_sentences=sentences, impression=impression, clinical=clinical,
                technique=technique, patient=patient)


def csv_rows(phantom, name: str) -> tuple[dict, dict, dict, dict]:
    """(report row, labels row, metadata row, findings-bank entry) of a Phantom written as the volume
    file `name`, with the columns of sigvlp.data.ctrate (REPORT_COLUMNS, LABEL_COLUMNS,
    METADATA_COLUMNS) and the findings bank's {"VolumeName", "organs", "general"}."""
    sz, sy, sx = phantom.spacing
    nz, ny, nx = phantom.hu.shape
    report = {"VolumeName": name, "ClinicalInformation_EN": phantom.clinical, "Technique_EN": phantom.technique,
              "Findings_EN": " ".join(s for ss in phantom.organ_sentences.values() for s in ss),
              "Impressions_EN": phantom.impression}
    labels = {"VolumeName": name, **phantom.labels_present}
    meta = {"VolumeName": name, "Manufacturer": phantom.patient["Manufacturer"], "SeriesDescription": "CHEST",
            "ManufacturerModelName": "Phantom", "PatientSex": phantom.patient["PatientSex"],
            "PatientAge": phantom.patient["PatientAge"], "ReconstructionDiameter": round(nx * sx, 1),
            "Rows": ny, "Columns": nx, "RescaleIntercept": int(RESCALE_INTERCEPT), "RescaleSlope": int(RESCALE_SLOPE),
            "XYSpacing": f"[{sy:g}, {sx:g}]", "ZSpacing": sz, "NumberofSlices": nz}
    bank = {"VolumeName": name, "organs": phantom.organ_sentences, "general": phantom.impression}
    return report, labels, meta, bank
