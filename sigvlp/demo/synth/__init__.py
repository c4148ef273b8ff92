"""Synthetic chest-CT phantoms written as a CT-RATE-style dataset.

Each phantom is a chest CT in HU built in patient coordinates (mm, RAS+): air, a body outline
with subcutaneous fat, chest-wall muscle, lungs (five lobes), mediastinal fat, heart, aorta
(ascending, arch, descending), trachea with main bronchi, esophagus, liver, spleen, stomach with
its gas bubble, kidneys (when in the field of view), vertebrae with discs and spinal canal, ribs
and sternum; Gaussian noise on top. Tissue HU: air -1000, lung about -850, fat about -100,
muscle 45, blood 50, liver 60, cancellous bone 250, cortical bone 700, calcium 400..800,
metal 3000.

Twelve of CT-RATE's 18 abnormalities are drawn into the image and stated in the report, the
label CSV and the organ findings, with CT-RATE-like prevalences (`PREVALENCE`) and a share of
normal volumes: lung nodule, pleural effusion, cardiomegaly, pericardial effusion, emphysema,
consolidation, lung opacity (ground glass), atelectasis, arterial wall calcification, coronary
artery wall calcification, hiatal hernia and medical material (pacemaker with lead).

Scans vary in slices (about 60..400), z spacing (0.75..5 mm), in-plane size and spacing, and
file orientation (RAS or LPS affine). Files are int16 with scl_slope 1 / scl_inter -1024 in
the header (stored value = HU + 1024); masks are uint8 TotalSegmentator ids. Everything is a
pure function of (seed, index, config). ``make_phantom`` runs named steps over a shared scene
(``anatomy.ANATOMY_STEPS``, one painter per abnormality in ``lesions.ABNORMALITY_STEPS``,
``anatomy.noise_and_quantise``, ``reports.report_fields``); their random draws come in a fixed
order, so a seed always gives the same phantom (tests hold digests of a few).

Modules: ``config`` (SynthConfig, presets, prevalences, tissue HU), ``canvas`` (world grid and
painting), ``anatomy`` (the normal body), ``lesions`` (the findings), ``reports`` (report, label
and metadata text), ``phantom`` (Phantom, make_phantom), ``writing`` (NIfTI and CSV files, the
synth.json marker, the default dataset), ``cli`` (``sigvlp synth``). Every public name is
importable from this package.

Output (``write_dataset``)::

    OUT/dataset/{train,valid}/<split>_<pid>/<split>_<pid>_a/<split>_<pid>_a_1.nii.gz
    OUT/dataset/radiology_text_reports/{train,validation}_reports.csv
    OUT/dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
    OUT/dataset/metadata/{train,validation}_metadata.csv
    OUT/masks/{train,valid}/...same relative path....nii.gz
    OUT/findings/{train,valid}_findings.jsonl

Findings bank (JSONL, one volume per line)::

    {"VolumeName": "train_1_a_1.nii.gz",
     "organs": {"lung": ["A 7 mm solid nodule is seen in the right upper lobe."],
                "heart": ["Heart size is normal. There is no pericardial effusion."], ...},
     "general": "Lung nodule in the right upper lobe."}

Organ keys are the names in sigvlp.data.organs.ORGANS; "general" is the report's impression.
"""

from sigvlp.demo.synth.config import DRAWN, HU, PREVALENCE, RESCALE_INTERCEPT, RESCALE_SLOPE, SYNTH_PRESETS, SynthConfig
from sigvlp.demo.synth.lesions import LOBE_NAMES, sample_findings
from sigvlp.demo.synth.phantom import Phantom, make_phantom
from sigvlp.demo.synth.reports import CLINICAL, NORMAL_SENTENCES
from sigvlp.demo.synth.writing import (DEFAULT_DATASET, MARKER, WRITTEN, check_overwritable, clear_previous,
                                       default_dataset_dir, ensure_default_dataset, save_nifti, volume_name,
                                       write_dataset, written_files)

__all__ = ["CLINICAL", "DEFAULT_DATASET", "DRAWN", "HU", "LOBE_NAMES", "MARKER", "NORMAL_SENTENCES", "PREVALENCE",
           "Phantom", "RESCALE_INTERCEPT", "RESCALE_SLOPE", "SYNTH_PRESETS", "SynthConfig", "WRITTEN",
           "check_overwritable", "clear_previous", "default_dataset_dir", "ensure_default_dataset", "make_phantom",
           "sample_findings", "save_nifti", "volume_name", "write_dataset", "written_files"]
