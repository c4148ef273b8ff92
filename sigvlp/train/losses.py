"""The training objective: SigLIP's sigmoid loss plus optional weighted terms, each an object.

``Losses`` computes ``main + sum(weight_i * term_i)``: main is ``sigvlp.ops.sigmoid_loss`` of the
batch's chunks and texts with their pair ids (global negatives across ranks through the process
group). The extra terms exist only when their weight is > 0 (``build_losses``):

- ``PromptSupervision`` (``TrainConfig.prompt_weight``): CT-CLIP style statements as extra text
  pairs, their truth per chunk from the prompt topics (sigvlp.prompts);
- ``TopicDecorrelation`` (``TrainConfig.prompt_decorrelation``): the mean squared cosine between
  the topics' score directions (sigvlp.prompts.direction_decorrelation).

Both read the prompt statements, which ``PromptStatements`` tokenizes once (the model's
tokenizer and max_text_tokens), keeps on the device and appends to every batch's texts, so the
statements are encoded in the same forward as the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sigvlp.ops import sigmoid_loss
from sigvlp.prompts import PromptTopics, direction_decorrelation, topic_sigmoid_loss
from sigvlp.train.step import Batch

__all__ = ["Embeddings", "Losses", "PromptStatements", "PromptSupervision", "TERM_NAMES", "TopicDecorrelation",
           "build_losses"]

#: the extra terms' names (metrics.jsonl has a loss_<name> column for each, 0 when the term is off)
TERM_NAMES = ("prompt", "decorrelation")


@dataclass(frozen=True)
class Embeddings:
    """What a loss term reads. image: (B, D) float32 chunk embeddings; texts: (B + S, D) float32,
    the batch's own texts then its S prompt statements; scale, bias: () float32, the model's t and
    b; batch: the Batch (host metadata for truth tables). ``text`` / ``statements``: the two parts
    (statements None without them), a new view per access, so that each reader's gradient reaches
    the text embeddings through its own slice (the accumulation order of the original step)."""

    image: torch.Tensor
    texts: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    batch: Batch
    has_statements: bool = False

    @property
    def text(self) -> torch.Tensor:
        return self.texts[:self.batch.num_chunks]

    @property
    def statements(self) -> Optional[torch.Tensor]:
        return self.texts[self.batch.num_chunks:] if self.has_statements else None


class PromptStatements:
    """The prompt topics' statements (``PromptTopics.texts``: per topic, positive then negative),
    tokenized once; ``append`` adds them to a batch's texts on the batch's device.

    depths: volume name -> slices after preprocessing (a chunk's coverage of its volume is
    (z1 - z0) / depth; an unknown volume counts as fully covered)."""

    def __init__(self, topics: PromptTopics, tokenizer, max_text_tokens: int, depths: dict[str, int]):
        self.topics = topics
        self.depths = dict(depths)
        ids = [tokenizer.encode(t, max_text_tokens) for t in topics.texts]
        self._ids = torch.tensor([i for r in ids for i in r], dtype=torch.int64)
        self._lengths = torch.tensor([len(r) for r in ids], dtype=torch.int64)
        self._max = int(self._lengths.max())
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.topics.texts)

    def append(self, batch: Batch) -> Batch:
        dev = batch.patches.device
        if dev not in self._on:  # moved to the device once, reused every step
            self._on[dev] = (self._ids.to(dev), self._lengths.to(dev))
        ids, lengths = self._on[dev]
        return batch.with_texts(ids, lengths, self._max)

    def truth(self, batch: Batch) -> torch.Tensor:
        """(num_topics, B) int64 on the host: PromptTopics.truth of the batch's chunks."""
        cover = [(z1 - z0) / self.depths.get(name, z1 - z0) for name, (z0, z1) in zip(batch.names, batch.z_ranges)]
        return self.topics.truth(batch.names, batch.organs, cover)


class PromptSupervision:
    """Per topic, SigLIP's sigmoid loss of the chunks against the topic's two statements, the true
    one the positive; chunks where "present" is true and those where "not present" is true are
    weighted 0.5 each (balanced: most abnormalities are rare); unknown chunks are left out. Mean
    over topics. Bias 0, not the model's (about -10, set by the many negatives of the main loss):
    the false statement is pushed away as hard as the true one is pulled (the two-way softmax of
    zero-shot scoring does not see the bias). All topics in one call (sigvlp.prompts.
    topic_sigmoid_loss: the value of two sigmoid_loss calls per topic). Under DDP each rank
    balances its own chunks and DDP averages the ranks' gradients. backend: kept for callers;
    the batched loss is plain torch on every device."""

    name = "prompt"

    def __init__(self, weight: float, statements: PromptStatements, backend: Optional[str] = None):
        self.weight = float(weight)
        self.statements = statements
        self.backend = backend

    def __call__(self, emb: Embeddings) -> torch.Tensor:
        return topic_sigmoid_loss(emb.image, emb.statements, emb.scale, self.statements.truth(emb.batch))


class TopicDecorrelation:
    """direction_decorrelation of the prompt statements' embeddings (sigvlp.prompts)."""

    name = "decorrelation"

    def __init__(self, weight: float):
        self.weight = float(weight)

    def __call__(self, emb: Embeddings) -> torch.Tensor:
        return direction_decorrelation(emb.statements)


class Losses:
    """main + sum(term.weight * term(embeddings)) over `terms` (objects with name, weight and
    __call__(Embeddings) -> scalar). statements: appended to each batch's texts (None: none).
    backend / group: sigvlp.ops backend and process group of the main sigmoid loss."""

    def __init__(self, terms: Sequence = (), statements: Optional[PromptStatements] = None, *,
                 backend: Optional[str] = None, group=None):
        self.terms = list(terms)
        self.statements = statements
        self.backend = backend
        self.group = group

    @property
    def names(self) -> tuple[str, ...]:
        return ("main", *(t.name for t in self.terms))

    def prepare(self, batch: Batch) -> Batch:
        """The batch with the statements appended to its texts (when there are any)."""
        return batch if self.statements is None else self.statements.append(batch)

    def __call__(self, out, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, {"main": ..., term name: ...}) from a SigVLPOutput of prepare(batch)."""
        img, txt = out.image_emb.float(), out.text_emb.float()
        scale, bias = out.logit_scale.float(), out.logit_bias.float()
        emb = Embeddings(img, txt, scale, bias, batch, has_statements=self.statements is not None)
        main = sigmoid_loss(img, emb.text, scale, bias, image_ids=batch.image_pair_ids,
                            text_ids=batch.text_pair_ids, process_group=self.group, backend=self.backend)
        total, parts = main, {"main": main}
        for term in self.terms:
            parts[term.name] = term(emb)
            total = total + term.weight * parts[term.name]
        return total, parts


def build_losses(config, data, tokenizer, max_text_tokens: int, *, group=None, log=print) -> Losses:
    """The Losses of a TrainConfig: the prompt terms only when their weights are > 0.

    data: the run's TrainData (sigvlp.train.builders.build_data; None with a batch source, which
    has no labels or organs per chunk: ValueError when prompt_weight > 0)."""
    terms, statements = [], None
    if config.prompt_weight > 0:
        if data is None:
            raise ValueError("prompt_weight > 0 needs the dataset loader (labels and organs per chunk)")
        topics = PromptTopics.from_records(data.records, data.present_organs)
        statements = PromptStatements(topics, tokenizer, max_text_tokens, data.depths)
        log(f"prompt supervision: {len(topics.labels)} abnormalities, {len(topics.organs)} organs "
            f"(weight {config.prompt_weight})")
        terms.append(PromptSupervision(config.prompt_weight, statements, config.backend))
    if config.prompt_decorrelation > 0:
        terms.append(TopicDecorrelation(config.prompt_decorrelation))
    return Losses(terms, statements, backend=config.backend, group=group)
