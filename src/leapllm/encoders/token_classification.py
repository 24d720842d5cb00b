"""Token classification / named-entity recognition (*ForTokenClassification folders), as
transformers' TokenClassificationPipeline does it.

    ner = TokenClassifier("./bert-conll03")
    ner(["My name is Wolfgang and I live in Berlin"], aggregation_strategy="simple")
    # [[{"entity_group": "PER", "score": 0.99, "word": "wolfgang", "start": 11, "end": 19}, ...]]

Every token's label scores are a softmax over its logits; special tokens are skipped. Then, by
`aggregation_strategy`:
  none     one entry per token ({"entity", "score", "index", "word", "start", "end"});
  simple   adjacent tokens whose labels share a tag (B-PER, I-PER) merge into one entity, unless
           the next one begins a new one (B-); its score is the mean of theirs;
  first / average / max   the sub-word pieces of a word first agree on one label (the first
           piece's, the average of the pieces' scores, or the most confident piece's), then the
           words are grouped as in simple.
A piece is a sub-word when the tokenizer marks continuations (WordPiece's "##": the token is
longer or shorter than the text it covers), else when no space precedes it in the text; unknown
tokens are always words of their own. Entities labelled with `ignore_labels` (default "O") are
dropped. Offsets are characters of the text; "word" is the pieces decoded by the tokenizer.

Texts longer than the model are cut to its limit, as the pipeline does, unless `stride` is given:
then they are read in overlapping windows (stride tokens of overlap) and overlapping entities are
resolved in favour of the longer (then the more confident) one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding

from leapllm.encoders.task_runner import Feature, TaskRunner, check_texts, softmax
from leapllm.errors import InvalidRequestError

AGGREGATIONS = ("none", "simple", "first", "average", "max")
DEFAULT_AGGREGATION = "simple"


@dataclass
class NERJob:
    texts: list[str]
    windows: list[list[Encoding]]  # per text
    features: list[Feature]  # every window of every text, in order


class TokenClassifier(TaskRunner):
    task = "token-classification"

    def prepare(self, texts: Sequence[str], stride: int | None = None,
                aggregation_strategy: str = DEFAULT_AGGREGATION) -> NERJob:
        texts = check_texts(texts)
        check_aggregation(aggregation_strategy)
        truncation = {"max_length": self.max_tokens}
        if stride is not None:
            if aggregation_strategy == "none":
                raise InvalidRequestError("stride reads long texts in windows, whose tokens need an "
                                          "aggregation_strategy other than none")
            if not 0 <= stride < self.max_tokens:
                raise InvalidRequestError(f"stride must be between 0 and {self.max_tokens - 1} (the model's "
                                          f"limit - 1), got {stride}")
            truncation["stride"] = stride
        encodings = self.encode(texts, truncation)
        windows = [[enc, *enc.overflowing] if stride is not None else [enc] for enc in encodings]
        return NERJob(texts, windows, [Feature.of(w) for text in windows for w in text])

    def decode(self, job: NERJob, outputs: Sequence[np.ndarray], aggregation_strategy: str = DEFAULT_AGGREGATION,
               ignore_labels: Sequence[str] | None = None) -> list[list[dict]]:
        """Per text, its entities (or tokens, with aggregation none), in text order."""
        check_aggregation(aggregation_strategy)
        ignore = ["O"] if ignore_labels is None else list(ignore_labels)
        results, next_output = [], 0
        for text, windows in zip(job.texts, job.windows, strict=True):
            entities = []
            for window in windows:
                scores = softmax(outputs[next_output].astype(np.float32))  # (tokens, labels)
                next_output += 1
                grouped = self._aggregate(self._pieces(text, window, scores, aggregation_strategy),
                                          aggregation_strategy)
                entities += [e for e in grouped if e.get("entity", e.get("entity_group")) not in ignore]
            if len(windows) > 1:
                entities = resolve_overlaps(entities)
            results.append([_plain(e) for e in entities])
        return results

    def __call__(self, texts: Sequence[str], aggregation_strategy: str = DEFAULT_AGGREGATION,
                 stride: int | None = None, ignore_labels: Sequence[str] | None = None) -> list[list[dict]]:
        """TokenClassificationPipeline(texts, aggregation_strategy=..., stride=...): per text, its entities."""
        job = self.prepare(texts, stride, aggregation_strategy)
        return self.decode(job, self.forward(job.features), aggregation_strategy, ignore_labels)

    # -- the pipeline's steps --------------------------------------------------------------------
    def _pieces(self, text: str, window: Encoding, scores: np.ndarray, strategy: str) -> list[dict]:
        """One entry per real token: its vocabulary string, scores, offsets, and whether it continues a word."""
        marks_continuations = bool(getattr(self.tokenizer.model, "continuing_subword_prefix", None))
        unk_id = self.loaded.special_ids.get("unk")
        pieces = []
        for index, (token_id, special, (start, end)) in enumerate(
                zip(window.ids, window.special_tokens_mask, window.offsets, strict=True)):
            if special:
                continue
            word, covered = self.tokenizer.id_to_token(token_id), text[start:end]
            if marks_continuations:
                is_subword = len(word) != len(covered)
            else:  # a heuristic for tokenizers that do not mark continuations (byte-level BPE, Unigram)
                is_subword = start > 0 and " " not in text[start - 1:start + 1]
            if token_id == unk_id:
                word, is_subword = covered, False
            pieces.append({"word": word, "scores": scores[index], "start": start, "end": end, "index": index,
                           "is_subword": is_subword})
        return pieces

    def _aggregate(self, pieces: list[dict], strategy: str) -> list[dict]:
        if strategy in ("none", "simple"):
            entities = []
            for piece in pieces:
                best = int(piece["scores"].argmax())
                entities.append({"entity": self.labels[best], "score": piece["scores"][best], "index": piece["index"],
                                 "word": piece["word"], "start": piece["start"], "end": piece["end"]})
        else:
            entities = self._aggregate_words(pieces, strategy)
        return entities if strategy == "none" else self._group(entities)

    def _aggregate_words(self, pieces: list[dict], strategy: str) -> list[dict]:
        words, group = [], []
        for piece in pieces:
            if group and not piece["is_subword"]:
                words.append(self._word(group, strategy))
                group = []
            group.append(piece)
        if group:
            words.append(self._word(group, strategy))
        return words

    def _word(self, pieces: list[dict], strategy: str) -> dict:
        """The pieces of one word as one entity, labelled by the strategy."""
        if strategy == "first":
            scores = pieces[0]["scores"]
        elif strategy == "max":
            scores = max(pieces, key=lambda p: p["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([p["scores"] for p in pieces]), axis=0)
        best = int(scores.argmax())
        return {"entity": self.labels[best], "score": scores[best], "word": self._join([p["word"] for p in pieces]),
                "start": pieces[0]["start"], "end": pieces[-1]["end"]}

    def _group(self, entities: list[dict]) -> list[dict]:
        """Adjacent entities with the same tag, where the next one does not begin (B-) a new one."""
        groups, current = [], []
        for entity in entities:
            if current:
                begins, tag = split_tag(entity["entity"])
                _, last_tag = split_tag(current[-1]["entity"])
                if tag != last_tag or begins == "B":
                    groups.append(self._merge(current))
                    current = []
            current.append(entity)
        if current:
            groups.append(self._merge(current))
        return groups

    def _merge(self, entities: list[dict]) -> dict:
        return {"entity_group": entities[0]["entity"].split("-", 1)[-1],
                "score": np.mean(np.nanmean([e["score"] for e in entities])),
                "word": self._join([e["word"] for e in entities]),
                "start": entities[0]["start"], "end": entities[-1]["end"]}

    def _join(self, tokens: list[str]) -> str:
        decoder = self.tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)


def check_aggregation(strategy: str) -> None:
    if strategy not in AGGREGATIONS:
        raise InvalidRequestError(f"aggregation_strategy must be one of {', '.join(AGGREGATIONS)}, got {strategy!r}")


def split_tag(label: str) -> tuple[str, str]:
    """("B" or "I", tag) of an IOB label; a label without a prefix continues (I)."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def resolve_overlaps(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows, each region kept once: the longer entity, then the more confident."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda e: e["start"])
    kept, previous = [], entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            length, previous_length = entity["end"] - entity["start"], previous["end"] - previous["start"]
            if length > previous_length or (length == previous_length and entity["score"] > previous["score"]):
                previous = entity
        else:
            kept.append(previous)
            previous = entity
    kept.append(previous)
    return kept


def _plain(entity: dict) -> dict:
    """JSON-ready: Python floats and ints instead of NumPy scalars."""
    return {k: float(v) if isinstance(v, np.floating) else int(v) if isinstance(v, np.integer) else v
            for k, v in entity.items()}
