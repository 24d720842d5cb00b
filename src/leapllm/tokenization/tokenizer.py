"""Text <-> token ids, built from a GGUF file's metadata or a Hugging Face tokenizer folder.

The BPE itself runs in Hugging Face `tokenizers` (Rust). This module only assembles that tokenizer
the way the model expects it (vocabulary, merges, pre-tokenizer split regex, special tokens) and
keeps the facts generation needs next to it: BOS/EOS ids, the ids that end a turn, and the chat
template.

For GGUF files we follow llama.cpp, whose format it is: `tokenizer.ggml.pre` picks the split regex,
`tokenizer.ggml.token_type` says which tokens are control / user-defined, and the end-of-turn ids
are found by name as llama.cpp does.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import compress, repeat
from operator import ne
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from leapllm.errors import TokenizerError
from leapllm.kernels import cpu_kernels
from leapllm.tokenization.chat_template import GEMMA_TURN_TEMPLATE, render_chat_template

logger = logging.getLogger(__name__)

# Longer texts are tokenized without holding the GIL, so that a server's event loop keeps running.
LONG_TEXT_CHARS = 4096

# llama.cpp token types (`tokenizer.ggml.token_type`, gguf.TokenType).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
TOKEN_TYPE_UNUSED = 5
TOKEN_TYPE_BYTE = 6

# Tokens that end a turn, by name; llama.cpp's end-of-generation list (llama-vocab.cpp).
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<EOT>",
    "<end_of_utterance>",
)

# --- pre-tokenizer split regexes, by `tokenizer.ggml.pre` (as in llama.cpp's llama-vocab.cpp) ---

# Llama 3's regex: letters with one leading non-letter, numbers in groups of up to three.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's regex: Llama 3's, but every digit on its own.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Every digit is its own piece, then the GPT-2 regex (SmolLM, StarCoder, ...): the `Digits` step of
# their original tokenizer.json. SmolLM2's vocabulary shows it was trained so: apart from "0".."9"
# no token contains an ASCII digit, and no merge involves one.
INDIVIDUAL_DIGITS_THEN_GPT2_PRE = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
)
LLAMA3_PRE = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx", "smaug-bpe"}
)
QWEN2_PRE = frozenset({"qwen2", "deepseek-r1-qwen", "kormo", "stablelm2", "megrez", "hunyuan"})
GPT4O_PRE = frozenset({"gpt-4o", "llama4", "minimax-m2"})
TEKKEN_PRE = frozenset({"tekken"})
# The plain GPT-2 regex. Anything unrecognised falls back to it too (as transformers does).
GPT2_PRE = frozenset(
    {"gpt2", "gpt-2", "default", "mpt", "olmo", "jais", "phi-2", "trillion", "granite-docling", "exaone4"}
)
# llama.cpp looks a whole pre-token up in the vocabulary before merging (`ignore_merges`) and adds
# BOS by default for these; the metadata key `tokenizer.ggml.add_bos_token` still wins.
IGNORE_MERGES_AND_ADD_BOS_PRE = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}
)


def _byte_level_pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The split a byte-level BPE vocabulary was trained with, chosen by `tokenizer.ggml.pre`."""

    def split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex built in
    if pre in INDIVIDUAL_DIGITS_THEN_GPT2_PRE:
        # `Digits` isolates every char with Unicode category N, exactly llama.cpp's `\p{N}` split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in LLAMA3_PRE:
        return split_then_bytes(LLAMA3_SPLIT)
    if pre in QWEN2_PRE:
        return split_then_bytes(QWEN2_SPLIT)
    if pre in GPT4O_PRE:
        return split_then_bytes(GPT4O_SPLIT)
    if pre in TEKKEN_PRE:
        return split_then_bytes(TEKKEN_SPLIT)
    if pre is not None and pre not in GPT2_PRE:
        logger.warning("unrecognised tokenizer.ggml.pre %r; splitting text with the GPT-2 regex", pre)
    return gpt2


def _sentencepiece_merges(
    tokens: Sequence[str], scores: Sequence[float], mergeable: Sequence[bool]
) -> list[tuple[str, str]]:
    """Recover BPE merges from a SentencePiece vocabulary, which stores scores instead of merges.

    SentencePiece BPE repeatedly joins the adjacent pair whose joined piece has the highest score,
    so every way to cut a mergeable token into two vocabulary pieces is a merge, ranked by that
    token's score (best first). This is what transformers does for GGUF files too.
    """
    token_ids = {token: index for index, token in reversed(list(enumerate(tokens)))}
    ranked = []
    for index, (token, score, can_merge) in enumerate(zip(tokens, scores, mergeable)):
        if not can_merge:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in token_ids and right in token_ids:
                sort_key = (-score, -len(left), -len(right), index, token_ids[left], token_ids[right])
                ranked.append((sort_key, left, right))
    # Highest score first; ties broken the way transformers' `generate_merges` does.
    ranked.sort(key=lambda merge: merge[0])
    return [(left, right) for _, left, right in ranked]


def _split_merges(raw: list) -> list[tuple[str, str]]:
    """A byte-level BPE's merges ("left right") as pairs, split at the first space after position 0
    as llama.cpp splits them: in C++ where leapllm's kernels build (~50,000 merges at every load),
    else with str.find mapped over them."""
    ext = cpu_kernels()
    if ext is not None:
        try:
            return ext.split_merges(raw)
        except ValueError as e:  # the index of the first malformed entry
            bad = raw[int(str(e))]
    else:
        strings = all(isinstance(merge, str) for merge in raw)
        cuts = list(map(str.find, raw, repeat(" "), repeat(1))) if strings else [-1]
        if -1 not in cuts:
            return [(merge[:cut], merge[cut + 1:]) for merge, cut in zip(raw, cuts)]
        bad = next(m for m in raw if not isinstance(m, str) or m.find(" ", 1) < 0)
    raise TokenizerError(f"GGUF tokenizer.ggml.merges has a malformed entry {bad!r} (expected 'left right')")


def _special_token_content(value: Any) -> str | None:
    """`tokenizer_config.json` writes special tokens as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


class Tokenizer:
    """A model's tokenizer: encode/decode, special token ids, end-of-turn ids and chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        extra_stop_token_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.add_bos = add_bos
        self.chat_template = chat_template or self._turn_template()
        self.stop_token_ids = self._find_stop_token_ids(extra_stop_token_ids)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys, as plain Python values)."""
        model_type = metadata.get("tokenizer.ggml.model")
        if model_type is None:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.model; the file carries no tokenizer")
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(map(isinstance, tokens, repeat(str))):
            raise TokenizerError("GGUF metadata has no usable tokenizer.ggml.tokens (a non-empty list of strings)")
        token_types = metadata.get("tokenizer.ggml.token_type")
        if token_types is None:
            token_types = [TOKEN_TYPE_NORMAL] * len(tokens)
        elif not isinstance(token_types, list) or len(token_types) != len(tokens):
            count = len(token_types) if isinstance(token_types, list) else "no"
            raise TokenizerError(f"GGUF tokenizer.ggml.token_type has {count} entries for {len(tokens)} tokens")
        pre = metadata.get("tokenizer.ggml.pre")

        if model_type == "gpt2":
            backend = cls._byte_level_bpe_from_gguf(metadata, tokens, pre)
            add_bos_default = pre in IGNORE_MERGES_AND_ADD_BOS_PRE
        elif model_type == "llama":
            backend = cls._sentencepiece_bpe_from_gguf(metadata, tokens, token_types)
            add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
        else:
            raise TokenizerError(
                f"unsupported tokenizer model {model_type!r} in GGUF metadata (supported: 'gpt2', 'llama')"
            )

        # Control tokens (and SentencePiece's <unk>) are matched whole in text and are "special"
        # (skippable in decode); user-defined ones are matched whole too but are ordinary text.
        # (A few hundred tokens of a vocabulary of up to ~250,000 are not normal: picked out in C loops.)
        kinds = list(compress(zip(tokens, token_types), map(ne, token_types, repeat(TOKEN_TYPE_NORMAL))))
        special = [t for t, kind in kinds if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_UNKNOWN)]
        user_defined = [t for t, kind in kinds if kind == TOKEN_TYPE_USER_DEFINED]
        # The tokens already sit in the model's vocabulary, so these keep their ids.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])

        def token_id(key: str) -> int | None:
            value = metadata.get(f"tokenizer.ggml.{key}")
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens):
                raise TokenizerError(
                    f"GGUF tokenizer.ggml.{key} = {value!r} is not a token id (vocabulary has {len(tokens)})"
                )
            return value

        add_bos = metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)
        extra_stop_ids = [i for i in (token_id("eot_token_id"), token_id("eom_token_id")) if i is not None]
        chat_template = metadata.get("tokenizer.chat_template")
        return cls(
            backend,
            vocab_size=len(tokens),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("padding_token_id"),
            add_bos=bool(add_bos),
            chat_template=chat_template if isinstance(chat_template, str) and chat_template else None,
            extra_stop_token_ids=extra_stop_ids,
        )

    @staticmethod
    def _vocab(tokens: Sequence[str]) -> dict[str, int]:
        # A few files repeat a token string; the first id keeps it (the others can't be produced by encode).
        return dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))  # (the last write of a key wins)

    @classmethod
    def _byte_level_bpe_from_gguf(
        cls, metadata: Mapping[str, Any], tokens: list[str], pre: str | None
    ) -> BackendTokenizer:
        """GPT-2 style byte-level BPE. Tokens are already spelled in GPT-2's byte-to-unicode alphabet."""
        raw_merges = metadata.get("tokenizer.ggml.merges")
        if not isinstance(raw_merges, list) or not raw_merges:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.merges, which a 'gpt2' tokenizer needs")
        merges = _split_merges(raw_merges)
        model = models.BPE(
            vocab=cls._vocab(tokens),
            merges=merges,
            ignore_merges=pre in IGNORE_MERGES_AND_ADD_BOS_PRE,
        )
        backend = BackendTokenizer(model)
        backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        return backend

    @classmethod
    def _sentencepiece_bpe_from_gguf(
        cls, metadata: Mapping[str, Any], tokens: list[str], token_types: list[int]
    ) -> BackendTokenizer:
        """SentencePiece BPE (Llama 1/2, Mistral, ...): `▁` for spaces, `<0xNN>` byte fallback, scores."""
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise TokenizerError(
                "GGUF metadata for a 'llama' tokenizer needs tokenizer.ggml.scores, one per token"
            )
        # Control, byte and unused tokens are never produced by merging text.
        mergeable = [kind in (TOKEN_TYPE_NORMAL, TOKEN_TYPE_USER_DEFINED) for kind in token_types]
        unknown_id = metadata.get("tokenizer.ggml.unknown_token_id")
        unknown = tokens[unknown_id] if isinstance(unknown_id, int) and 0 <= unknown_id < len(tokens) else None
        model = models.BPE(
            vocab=cls._vocab(tokens),
            merges=_sentencepiece_merges(tokens, scores, mergeable),
            unk_token=unknown,
            fuse_unk=True,
            byte_fallback=True,
        )
        backend = BackendTokenizer(model)
        add_space_prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
        # Spaces become `▁`, and (as sentencepiece does) one is prepended to the start of the text only.
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_space_prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))  # undo the prepended space
        backend.decoder = decoders.Sequence(steps)
        return backend

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer folder: `tokenizer.json` plus the config files next to it."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(f"{folder}: no tokenizer.json (a Hugging Face model folder needs one)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{tokenizer_file}: not a valid tokenizer.json ({exc})") from None

        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}

        def id_of(key: str) -> int | None:
            content = _special_token_content(config.get(key))
            return backend.token_to_id(content) if content is not None else None

        bos_token_id = id_of("bos_token")
        eos_token_id = id_of("eos_token")
        pad_token_id = id_of("pad_token")

        if isinstance(config.get("add_bos_token"), bool):
            add_bos = config["add_bos_token"]
        else:
            # No flag: BOS is added by tokenizer.json's post-processor if at all (Llama 3 does this).
            probe = backend.encode("", add_special_tokens=True).ids
            add_bos = bos_token_id is not None and probe[:1] == [bos_token_id]

        # generation_config.json may list several end ids (e.g. Llama 3: <|end_of_text|>, <|eot_id|>).
        extra_stop_ids: list[int] = []
        generation_file = folder / "generation_config.json"
        if generation_file.is_file():
            eos_ids = _read_json(generation_file).get("eos_token_id")
            for value in eos_ids if isinstance(eos_ids, list) else [eos_ids]:
                if isinstance(value, int) and not isinstance(value, bool):
                    extra_stop_ids.append(value)
        if eos_token_id is None and extra_stop_ids:
            eos_token_id = extra_stop_ids[0]

        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            add_bos=add_bos,
            chat_template=cls._chat_template_from_dir(folder, config),
            extra_stop_token_ids=extra_stop_ids,
        )

    @staticmethod
    def _chat_template_from_dir(folder: Path, config: Mapping[str, Any]) -> str | None:
        """`chat_template.jinja` (what recent transformers writes), else tokenizer_config.json's entry."""
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = config.get("chat_template")
        if isinstance(template, list):
            # Several named templates: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if template is None:
            json_file = folder / "chat_template.json"
            if json_file.is_file():
                template = _read_json(json_file).get("chat_template")
        return template if isinstance(template, str) and template else None

    def _turn_template(self) -> str | None:
        """For a file without a chat template whose vocabulary has Gemma's turn tokens (some Gemma
        GGUFs ship so), Gemma's own turn format."""
        if self._backend.token_to_id("<start_of_turn>") is None or self._backend.token_to_id("<end_of_turn>") is None:
            return None
        return GEMMA_TURN_TEMPLATE

    def _find_stop_token_ids(self, extra_stop_token_ids: Iterable[int]) -> frozenset[int]:
        """EOS, the explicit end ids, and any well-known end-of-turn token the vocabulary has."""
        stop_ids = {i for i in extra_stop_token_ids if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            stop_ids.add(self.eos_token_id)
        by_name = {name: self._backend.token_to_id(name) for name in END_OF_TURN_TOKENS}
        # gpt-oss ends a message with <|end|> but a whole reply with <|return|> or <|call|>.
        if by_name["<|return|>"] is not None and by_name["<|call|>"] is not None:
            by_name["<|end|>"] = None
        stop_ids.update(i for i in by_name.values() if i is not None)
        return frozenset(stop_ids)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and generation_config.json, which
        `from_pretrained_dir` reads back into an equivalent tokenizer (so a model saved from a GGUF
        file keeps its tokenizer, chat template and end-of-turn ids)."""
        folder = Path(folder)
        self._backend.save(str(folder / "tokenizer.json"))
        config: dict[str, Any] = {"add_bos_token": self.add_bos}
        for key, token_id in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id),
                              ("pad_token", self.pad_token_id)):
            if token_id is not None:
                config[key] = self.id_to_token(token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        eos_ids = sorted(self.stop_token_ids)
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_ids}), encoding="utf-8")

    # ---------------------------------------------------------------- text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) become their ids.

        BOS is prepended only when the model wants it (`add_bos`) and `add_special_tokens` is set.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        # The backend's own post-processor is bypassed so that BOS handling lives in one place.
        if len(text) > LONG_TEXT_CHARS:  # encode_batch releases the GIL (encode does not): other threads run
            ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        else:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints: a list, a 1-D tensor, ...)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry's spelling: no token decodes to more characters, so a text
        of n characters has at least n / max_token_chars tokens (a bound that needs no tokenizing)."""
        return max((len(t) for t in self._backend.get_vocab(with_added_tokens=True)), default=1)

    def backend_json(self) -> str:
        """The Hugging Face `tokenizers` JSON of the BPE behind this tokenizer (what grammar engines read)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for an id (byte-level tokens in their GPT-2 alphabet spelling)."""
        return self._backend.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else None

    # ---------------------------------------------------------------- chat

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """The prompt text for a conversation, rendered with the model's chat template."""
        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Prompt ids for a conversation. BOS is added per `add_bos` unless the template already wrote it."""
        prompt = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **extra)
        template_wrote_bos = self.bos_token is not None and prompt.startswith(self.bos_token)
        return self.encode(prompt, add_special_tokens=not template_wrote_bos)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"add_bos={self.add_bos}, stop_token_ids={sorted(self.stop_token_ids)})"
        )
