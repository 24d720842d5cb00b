"""What the pretrained task heads share: a fine-tuned encoder folder, its tokenizer, and batched
forward passes over "features" (one tokenized input each: a text, or one window of a long one).

    runner = SomeTask("./bert-finetuned")        # a subclass: text classification, QA or NER
    features = [Feature(enc.ids, enc.type_ids) for enc in encodings]
    outputs = runner.forward(features)          # one float32 array per feature, in order

Each task splits its work in three: prepare (tokenize, maybe into windows: features), forward (the
model, here or through a server's batcher that merges concurrent requests' features), and
decode (the pipeline's post-processing). Forward passes are length-bucketed like the embedder's,
so one long input does not pad many short ones.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Encoding

from leapllm.encoders.embedder import length_buckets, quantize_encoder
from leapllm.errors import InvalidRequestError
from leapllm.loading.encoder_loader import LoadedTaskModel, load_task_model


@dataclass
class Feature:
    """One forward pass's worth of input: token ids with special tokens, and their token types."""
    ids: list[int]
    type_ids: list[int]

    @classmethod
    def of(cls, encoding: Encoding) -> Feature:
        return cls(list(encoding.ids), list(encoding.type_ids))


def check_texts(texts: Sequence[str], what: str = "input") -> list[str]:
    """A list of non-blank strings, else an InvalidRequestError naming the first bad one."""
    if isinstance(texts, str):
        raise InvalidRequestError(f"give a list of {what}s, not a single string")
    texts = list(texts)
    if not texts:
        raise InvalidRequestError(f"no {what} given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidRequestError(f"{what} {i} is not a string")
        if not text.strip():
            raise InvalidRequestError(f"{what} {i} is empty")
    return texts


class TaskRunner:
    """A loaded task model; subclasses set `task` and add their prepare/decode steps."""

    task = ""  # the task a folder's architectures must name: text-classification, ...
    per_token = True  # the head gives one row per token (QA, NER), not one per input

    def __init__(self, model: str | Path | None = None, *, dtype: str = "float32", device: str = "cpu",
                 quantize: str | None = None, max_batch_size: int = 32, max_batch_tokens: int = 2048,
                 loaded: LoadedTaskModel | None = None):
        if max_batch_size < 1 or max_batch_tokens < 1:
            raise InvalidRequestError("max_batch_size and max_batch_tokens must be at least 1")
        if loaded is None:
            if model is None:
                raise InvalidRequestError(f"a {self.task} model folder is needed")
            loaded = load_task_model(model, self.task, dtype=dtype, device=device)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
        # The tokenizer's truncation is one setting shared by every caller: set it and encode under a lock.
        self._tokenizer_lock = threading.Lock()
        self.quantization = quantize_encoder(self.model, quantize)

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def labels(self) -> list[str]:
        return self.loaded.labels

    @property
    def max_tokens(self) -> int:
        return self.loaded.max_tokens

    def encode(self, inputs: list, truncation: dict | None = None) -> list[Encoding]:
        """tokenizers' encode_batch of texts or (text, pair) tuples, with `truncation` (enable_truncation's
        arguments) or none."""
        with self._tokenizer_lock:
            try:
                if truncation is not None:
                    self.tokenizer.enable_truncation(**truncation)
                return self.tokenizer.encode_batch(inputs)
            except Exception as exc:  # tokenizers reports a truncation it cannot do as a bare Exception
                raise InvalidRequestError(f"cannot tokenize the input: {exc}") from None
            finally:
                self.tokenizer.no_truncation()

    # -- the model -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, features: Sequence[Feature]) -> list[np.ndarray]:
        """The head's float32 output of each feature: (tokens, outputs) per token, or (outputs,)."""
        out: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(features)
        for batch in length_buckets([len(f.ids) for f in features], self.max_batch_size, self.max_batch_tokens):
            logits = self._padded_forward([features[i] for i in batch])
            for row, i in enumerate(batch):
                out[i] = logits[row, :len(features[i].ids)] if self.per_token else logits[row]
        return out

    def _padded_forward(self, features: list[Feature]) -> np.ndarray:
        longest = max(len(f.ids) for f in features)
        input_ids = torch.full((len(features), longest), self.model.config.pad_token_id, dtype=torch.long)
        type_ids = torch.zeros(len(features), longest, dtype=torch.long)
        mask = torch.zeros(len(features), longest, dtype=torch.long)
        for row, f in enumerate(features):
            input_ids[row, :len(f.ids)] = torch.tensor(f.ids)
            type_ids[row, :len(f.ids)] = torch.tensor(f.type_ids)
            mask[row, :len(f.ids)] = 1
        device = self.model.device
        if self.model.config.type_vocab_size <= 1:
            type_ids.zero_()  # a model with one token type (RoBERTa) takes only type 0
        logits = self.model(input_ids.to(device), mask.to(device), type_ids.to(device))
        return logits.float().cpu().numpy()


def softmax(x: np.ndarray) -> np.ndarray:
    """Over the last axis, computed as transformers' pipelines do (so scores match to the last bit)."""
    shifted = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
