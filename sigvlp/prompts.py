"""The prompt statements of training and evaluation, and CT-CLIP style statements as extra text
pairs ("prompt supervision", as CT-CLIP's VocabFine).

One home for the templates: ``ABNORMALITY_PROMPTS`` / ``ORGAN_PROMPTS`` are what zero-shot
scoring (sigvlp.eval) compares an image with and what prompt supervision (sigvlp.train) trains on.

Zero-shot scoring (CT-CLIP) compares an image with "{label} is present." and "{label} is not
present."; a text tower trained from scratch on report sentences has never read a sentence of
that form. With ``TrainConfig.prompt_weight > 0`` every training batch adds, per topic, the pair
of statements (present / not present) as two extra texts, and a sigmoid loss per topic whose
pair ids say which of the two is true for each chunk:

- an abnormality topic (a label of the labels CSV with at least one positive volume): "not
  present" is true for every chunk of a volume without the label and for a chunk without the
  label's organs (``LABEL_ORGANS``; labels without an organ may be in any chunk); "present" is
  true for a chunk of a labelled volume covering at least ``min_coverage`` of its slices (a
  smaller chunk may miss the lesion: unknown, left out of that topic);
- an organ topic ("The {organ} is visible." / "... is not visible."): true "visible" when the
  organ is in the chunk (the organ z-profile rule of sigvlp.data.chunks).

Each topic's loss is ``sigvlp.ops.sigmoid_loss`` of the batch's images against the topic's two
texts, image id = the index of the true statement; every image-statement pair is labelled
correctly (the pair-id form cannot express "true for several images and several texts" in
one call, one call per topic can). The statements and their scores are what the demo's
zero-shot evaluation uses, so the demo's numbers measure prompt-level classification of unseen
volumes by the trained towers.

Topic-direction decorrelation (``TrainConfig.prompt_decorrelation``): a topic's zero-shot score
is the image embedding's projection on its direction d_k = t(present) - t(not present). A text
tower trained from scratch writes every "X is present." / "X is not present." pair mostly as
"... not ...", so the directions of different topics start and stay nearly parallel (mean
pairwise cosine 0.85-0.94 measured on the demo) and the image tower receives almost the same
gradient for every abnormality. ``direction_decorrelation`` penalises the mean squared cosine
between the directions of different topics (as orthogonality penalties on classifier weights do),
so each topic's statements have to carry their own direction.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

__all__ = ["ABNORMALITY_PROMPTS", "ORGAN_PROMPTS", "LABEL_ORGANS", "PromptTopics", "abnormality_prompts", "topic_sigmoid_loss",
           "direction_decorrelation", "organ_prompts"]

#: CT-CLIP's zero-shot prompt pair (positive first)
ABNORMALITY_PROMPTS = ("{label} is present.", "{label} is not present.")
#: organ presence prompt pair (positive first)
ORGAN_PROMPTS = ("The {organ} is visible.", "The {organ} is not visible.")

_LUNG = ("lung",)
#: CT-RATE label -> organs (sigvlp.data.organs.ORGANS) a chunk must hold to show it; None: any chunk
LABEL_ORGANS: dict[str, Optional[tuple[str, ...]]] = {
    "Medical material": None,
    "Arterial wall calcification": ("aorta",),
    "Cardiomegaly": ("heart",),
    "Pericardial effusion": ("heart",),
    "Coronary artery wall calcification": ("heart",),
    "Hiatal hernia": ("esophagus", "stomach"),
    "Lymphadenopathy": None,
    "Emphysema": _LUNG,
    "Atelectasis": _LUNG,
    "Lung nodule": _LUNG,
    "Lung opacity": _LUNG,
    "Pulmonary fibrotic sequela": _LUNG,
    "Pleural effusion": _LUNG,
    "Mosaic attenuation pattern": _LUNG,
    "Peribronchial thickening": _LUNG,
    "Consolidation": _LUNG,
    "Bronchiectasis": _LUNG,
    "Interlobular septal thickening": _LUNG,
}


def abnormality_prompts(label: str, templates: Sequence[str] = ABNORMALITY_PROMPTS) -> tuple[str, str]:
    return templates[0].format(label=label), templates[1].format(label=label)


def organ_prompts(organ: str, templates: Sequence[str] = ORGAN_PROMPTS) -> tuple[str, str]:
    return templates[0].format(organ=organ), templates[1].format(organ=organ)


class PromptTopics:
    """The topics of prompt supervision and each chunk's truth for them.

    labels: VolumeName -> {label: 0/1} (the labels CSV); labels: the abnormality topics; organs:
    the organ topics.
    """

    def __init__(self, volume_labels: Mapping[str, Mapping[str, int]], labels: Sequence[str],
                 organs: Sequence[str], min_coverage: float = 0.8):
        self.volume_labels = dict(volume_labels)
        self.min_coverage = float(min_coverage)
        self.labels = list(labels)
        self.organs = list(organs)
        self.texts: list[str] = []
        for label in self.labels:
            self.texts.extend(abnormality_prompts(label))
        for organ in self.organs:
            self.texts.extend(organ_prompts(organ))

    @classmethod
    def from_records(cls, records, organs: Sequence[str], min_coverage: float = 0.8) -> "PromptTopics":
        """Topics from dataset records (CTRateRecord: name, labels): every label with at least one
        positive volume, and the given organs."""
        volume_labels = {r.name: dict(r.labels or {}) for r in records}
        seen: dict[str, int] = {}
        for lab in volume_labels.values():
            for k, v in lab.items():
                seen[k] = max(seen.get(k, 0), int(v))
        labels = [k for k in LABEL_ORGANS if seen.get(k)] + [k for k in seen if seen[k] and k not in LABEL_ORGANS]
        return cls(volume_labels, labels, organs, min_coverage)

    @property
    def num_topics(self) -> int:
        return len(self.labels) + len(self.organs)

    def truth(self, names: Sequence[str], chunk_organs: Sequence[Sequence[str]],
              coverage: Optional[Sequence[float]] = None) -> torch.Tensor:
        """(num_topics, B) int64: 1 where the topic's positive statement is true for the chunk, 0
        where the negative one is, -1 where unknown (left out of that topic's loss).

        An abnormality is absent from every chunk of a volume without the label, and from a chunk
        without the label's organs; a labelled volume's chunk shows it only when it covers at
        least ``min_coverage`` of the volume's slices (coverage: per chunk, chunk slices / volume
        slices; None: every chunk counts as showing it). Organ truth is exact (the masks)."""
        out = torch.zeros(self.num_topics, len(names), dtype=torch.int64)
        for j, (name, organs) in enumerate(zip(names, chunk_organs)):
            organs = set(organs)
            lab = self.volume_labels.get(name)
            if lab is None:
                raise KeyError(f"prompt supervision: no labels for volume {name!r}")
            whole = coverage is None or coverage[j] >= self.min_coverage
            for i, label in enumerate(self.labels):
                need = LABEL_ORGANS.get(label)
                if not lab.get(label, 0) or (need is not None and not organs.intersection(need)):
                    out[i, j] = 0
                else:
                    out[i, j] = 1 if whole else -1
            for i, organ in enumerate(self.organs, start=len(self.labels)):
                out[i, j] = int(organ in organs)
        return out


def direction_decorrelation(statements: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine between the score directions of different topics.

    statements: (2 * K, D) float text embeddings, topic k's positive statement at row 2k and its
    negative at 2k + 1 (the order of ``PromptTopics.texts``). d_k = statements[2k] -
    statements[2k + 1]; returns the scalar mean over ordered pairs k != l of cos(d_k, d_l)^2, in
    [0, 1] (0: mutually orthogonal directions; 1: all parallel). K < 2 gives 0. A topic whose two
    statements coincide has no direction and contributes 0 (the cosine's norm is clamped at 1e-12).
    """
    if not isinstance(statements, torch.Tensor) or not statements.is_floating_point():
        raise TypeError(f"statements: expected a floating-point torch.Tensor, got "
                        f"{getattr(statements, 'dtype', type(statements).__name__)}")
    if statements.dim() != 2 or statements.shape[0] % 2:
        raise ValueError(f"statements: expected a (2 * K, D) tensor, got shape {tuple(statements.shape)}")
    k = statements.shape[0] // 2
    if k < 2:
        return statements.new_zeros(())
    d = torch.nn.functional.normalize(statements[0::2] - statements[1::2], dim=1, eps=1e-12)
    cos = d @ d.T
    off = cos - torch.diag_embed(torch.diagonal(cos))
    return off.square().sum() / (k * (k - 1))


def topic_sigmoid_loss(image: torch.Tensor, statements: torch.Tensor, scale: torch.Tensor,
                       truth: torch.Tensor) -> torch.Tensor:
    """Prompt supervision's loss for every topic at once (one matmul; the value of two
    ``sigvlp.ops.sigmoid_loss`` calls per topic, bias 0, weighted 0.5 each, averaged over topics).

    image: (B, D) float chunk embeddings; statements: (2 * K, D), topic k's positive statement at
    row 2k and its negative at 2k + 1 (``PromptTopics.texts``); scale: the logit multiplier t (a
    scalar tensor); truth: (K, B) int (``PromptTopics.truth``: 1 positive true, 0 negative true, -1
    unknown), on any device. With logits l = t * image @ statements^T and s = +1 (truth 1) / -1
    (truth 0), chunk i's loss for topic k is SigLIP's sigmoid loss against the two statements,
    softplus(-s * l[i, 2k]) + softplus(s * l[i, 2k + 1]) (-log sigmoid(x) = softplus(-x), Zhai et
    al. 2023), weighted 0.5 / (number of chunks with the same truth for topic k): the chunks where
    "present" is true and those where "not present" is true count equally. Unknown chunks are left
    out. Returns the float32 scalar sum over topics / K (0 for K = 0).
    """
    k = truth.shape[0]
    if statements.shape[0] != 2 * k or truth.dim() != 2 or truth.shape[1] != image.shape[0]:
        raise ValueError(f"truth: expected ({statements.shape[0] // 2}, {image.shape[0]}) for (topics, chunks), "
                         f"got {tuple(truth.shape)} (statements {tuple(statements.shape)})")
    if k == 0:
        return image.new_zeros((), dtype=torch.float32)
    truth = truth.to(image.device, non_blocking=True)
    pos, neg = truth == 1, truth == 0
    per_pos = 0.5 / pos.sum(1, keepdim=True).clamp_min(1)
    per_neg = 0.5 / neg.sum(1, keepdim=True).clamp_min(1)
    weight = torch.where(pos, per_pos, torch.where(neg, per_neg, 0.0))  # (K, B)
    sign = pos.float() - neg.float()
    logits = (scale.float() * (image.float() @ statements.float().T)).T  # (2K, B)
    nll = torch.nn.functional.softplus(-sign * logits[0::2]) + torch.nn.functional.softplus(sign * logits[1::2])
    return (weight * nll).sum() / k
