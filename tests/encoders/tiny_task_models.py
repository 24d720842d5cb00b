"""Tiny random-weight encoders with task heads, saved by transformers itself, for the task-head tests.

Each family starts from its real checkpoint's config.json (bert-base-uncased, distilbert-base-uncased,
roberta-base, xlm-roberta-base, albert-base-v2, values copied below) and is shrunk to 2 layers and
a width of 32 with a vocabulary that fits its tokenizer, every architectural switch kept (DistilBERT's
key names and missing token types, RoBERTa's pad-relative positions, ALBERT's 16-wide embeddings
and its one shared layer group). Each gets a tokenizer of its kind built with `tokenizers` (WordPiece
for BERT and DistilBERT, byte-level BPE for RoBERTa, Unigram with Metaspace for XLM-R and ALBERT),
saved with the model by transformers. Weights are redrawn wider than transformers' 0.02 init, so
that labels and answer spans are far from ties and must agree exactly with the reference.

`task_folder(family, task)` builds a folder once per test session and returns (folder, hf_model,
hf_tokenizer); every test module shares them. Test modules run them under `one_torch_thread()`:
models this small gain nothing from threads, and on a busy machine idle-spinning threads make
each forward pass a hundred times slower.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "albert")

REAL_CONFIGS = {
    "bert": {  # bert-base-uncased
        "model_type": "bert", "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
        "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "num_attention_heads": 12,
        "num_hidden_layers": 12, "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2,
        "vocab_size": 30522},
    "distilbert": {  # distilbert-base-uncased
        "model_type": "distilbert", "activation": "gelu", "attention_dropout": 0.1, "dim": 768, "dropout": 0.1,
        "hidden_dim": 3072, "initializer_range": 0.02, "max_position_embeddings": 512, "n_heads": 12,
        "n_layers": 6, "pad_token_id": 0, "qa_dropout": 0.1, "seq_classif_dropout": 0.2,
        "sinusoidal_pos_embds": False, "tie_weights_": True, "vocab_size": 30522},
    "roberta": {  # roberta-base
        "model_type": "roberta", "attention_probs_dropout_prob": 0.1, "bos_token_id": 0, "eos_token_id": 2,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
        "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 514,
        "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1, "type_vocab_size": 1,
        "vocab_size": 50265},
    "xlm-roberta": {  # xlm-roberta-base
        "model_type": "xlm-roberta", "attention_probs_dropout_prob": 0.1, "bos_token_id": 0, "eos_token_id": 2,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
        "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 514,
        "num_attention_heads": 12, "num_hidden_layers": 12, "output_past": True, "pad_token_id": 1,
        "position_embedding_type": "absolute", "type_vocab_size": 1, "vocab_size": 250002},
    "albert": {  # albert-base-v2
        "model_type": "albert", "attention_probs_dropout_prob": 0, "bos_token_id": 2, "classifier_dropout_prob": 0.1,
        "down_scale_factor": 1, "embedding_size": 128, "eos_token_id": 3, "gap_size": 0, "hidden_act": "gelu_new",
        "hidden_dropout_prob": 0, "hidden_size": 768, "initializer_range": 0.02, "inner_group_num": 1,
        "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "net_structure_type": 0,
        "num_attention_heads": 12, "num_hidden_groups": 1, "num_hidden_layers": 12, "num_memory_blocks": 0,
        "pad_token_id": 0, "position_embedding_type": "absolute", "type_vocab_size": 2, "vocab_size": 30000},
}
MAX_TOKENS = 64  # the tiny models' limit, so that the long context below needs several windows
SHRINK = {
    "bert": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
             "max_position_embeddings": MAX_TOKENS},
    "distilbert": {"dim": 32, "n_heads": 4, "hidden_dim": 64, "n_layers": 2, "max_position_embeddings": MAX_TOKENS},
    "roberta": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
                "max_position_embeddings": MAX_TOKENS + 2},
    "xlm-roberta": {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2,
                    "max_position_embeddings": MAX_TOKENS + 2},
    "albert": {"embedding_size": 16, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64,
               "num_hidden_layers": 2, "max_position_embeddings": MAX_TOKENS},
}
ARCHITECTURE = {"bert": "Bert", "distilbert": "DistilBert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta",
                "albert": "Albert"}
CLASS_LABELS = ["negative", "neutral", "positive"]
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]

CONTEXT = ("Marie Curie was a Polish and naturalised-French physicist and chemist who conducted pioneering "
           "research on radioactivity. She was the first woman to win a Nobel Prize, the first person to win "
           "a Nobel Prize twice, and the only person to win a Nobel Prize in two scientific fields. Her husband, "
           "Pierre Curie, was a co-winner of her first Nobel Prize. She was born in Warsaw, in what was then the "
           "Kingdom of Poland, part of the Russian Empire. She studied at Warsaw's clandestine Flying University "
           "and began her practical scientific training in Warsaw. In 1891, aged 24, she followed her elder "
           "sister Bronisława to study in Paris, where she earned her higher degrees.")
QA_PAIRS = [
    ("Where was Marie Curie born?", CONTEXT),  # far longer than 64 tokens: several windows
    ("Who was her husband?", CONTEXT),
    ("What did she research?", CONTEXT),
    ("What is the capital of France?", "Paris is the capital and most populous city of France."),
    ("Who wrote Hamlet?", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("When did the Berlin Wall fall?", "The Berlin Wall fell on 9 November 1989, opening the border."),
    ("How tall is Mount Everest?", "Mount Everest is 8,849 metres tall, the highest mountain on Earth."),
    ("What do bees make?", "Bees collect nectar from flowers and make honey in their hives."),
    ("Which river flows through Cairo?", "The Nile flows north through Egypt and past Cairo to the sea."),
    ("What language is spoken in Brazil?", "In Brazil, most people speak Portuguese; Spanish is rare."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa in Florence."),
    ("What is H2O?", "Water, or H2O, is made of hydrogen and oxygen atoms."),
]
NER_TEXTS = [
    "My name is Wolfgang and I live in Berlin.",
    "Hugging Face Inc. is a company based in New York City.",
    "Angela Merkel met Emmanuel Macron in Paris on Tuesday.",
    "Apple and Microsoft are headquartered in California and Washington.",
    "Sundar Pichai leads Google, which Larry Page co-founded.",
    "The Amazon river runs through Brazil, Peru and Colombia.",
    "Pierre Curie worked at the University of Paris with Marie.",
    "Zürich's ETH hired Albert Einstein in 1912.",
    "xylophones quizzically jumped over the zebra!",
    "Dr. Ngozi Okonjo-Iweala heads the World Trade Organization.",
    "Tokyo, Osaka and Kyoto are cities in Japan.",
    CONTEXT,
]
CLASSIFY_TEXTS = ["I loved this film, it was wonderful!", "The flight was delayed again.", "It is a chair.",
                  "Best crew ever, thank you!", "Terrible service and a lost bag.", "Meh.", "zzz qqq",
                  "Paris is lovely in the spring.", "Would not recommend.", "Five stars!!!", CONTEXT]


def _corpus() -> list[str]:
    texts = [q for q, _ in QA_PAIRS] + [c for _, c in QA_PAIRS] + NER_TEXTS[:-3] + CLASSIFY_TEXTS[:6]
    return texts + ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'-"] * 2


@functools.lru_cache(maxsize=None)
def family_tokenizer(family: str):
    """(tokenizers.Tokenizer, transformers' fast tokenizer wrapping it) of the family's kind."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = _corpus()
    if family in ("bert", "distilbert"):
        specials = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=list(specials.values()))
        tok.train_from_iterator(corpus, trainer)
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        tok.decoder = decoders.WordPiece()
    elif family == "roberta":
        specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                          add_prefix_space=False)
    else:  # SentencePiece-like Unigram: XLM-R's specials first, ALBERT's [CLS]/[SEP] and lower-casing
        if family == "xlm-roberta":
            order = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
            specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                        "mask_token": "<mask>", "cls_token": "<s>", "sep_token": "</s>"}
            single, pair = "<s> $A </s>", "<s> $A </s> </s> $B </s>"
            cls, sep = "<s>", "</s>"
        else:
            order = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
            specials = {"pad_token": "<pad>", "unk_token": "<unk>", "cls_token": "[CLS]", "sep_token": "[SEP]",
                        "mask_token": "[MASK]"}
            single, pair = "[CLS]:0 $A:0 [SEP]:0", "[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1"
            cls, sep = "[CLS]", "[SEP]"
        tok = Tokenizer(models.Unigram())
        if family == "albert":
            tok.normalizer = normalizers.Sequence([normalizers.Replace("``", '"'), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=order,
                                                                unk_token=specials["unk_token"]))
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    input_names = ["input_ids", "attention_mask"] if family in ("distilbert", "roberta", "xlm-roberta") \
        else ["input_ids", "token_type_ids", "attention_mask"]  # as each family's own tokenizer class says
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=MAX_TOKENS, model_input_names=input_names,
                                 **specials)
    return tok, hf


def tiny_config(family: str, **extra):
    from transformers import AutoConfig

    tok, _ = family_tokenizer(family)
    values = {**REAL_CONFIGS[family], **SHRINK[family], "vocab_size": tok.get_vocab_size(), **extra}
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def randomize(model, seed: int) -> None:
    """Weights far wider than the 0.02 init: logits spread out, so no decision rests on a near-tie."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


@contextlib.contextmanager
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        _ROOT.append(Path(tempfile.mkdtemp(prefix="leapllm-task-models-")))
        atexit.register(shutil.rmtree, _ROOT[0], ignore_errors=True)
    return _ROOT[0]


@functools.lru_cache(maxsize=None)
def task_folder(family: str, task: str, problem_type: str | None = None, num_labels: int | None = None):
    """(folder, transformers model in eval mode, transformers tokenizer) of a tiny fine-tuned model.
    task: base (the bare encoder), text-classification, question-answering or token-classification."""
    import transformers

    extra: dict = {}
    if task == "text-classification":
        labels = CLASS_LABELS if num_labels is None else [f"SCORE_{i}" for i in range(num_labels)]
        extra = {"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}}
        if problem_type:
            extra["problem_type"] = problem_type
    elif task == "token-classification":
        extra = {"id2label": dict(enumerate(NER_LABELS)), "label2id": {x: i for i, x in enumerate(NER_LABELS)}}
    config = tiny_config(family, attn_implementation="eager", **extra)
    suffix = {"base": "Model", "text-classification": "ForSequenceClassification",
              "question-answering": "ForQuestionAnswering", "token-classification": "ForTokenClassification"}[task]
    model = getattr(transformers, ARCHITECTURE[family] + suffix)(config)
    randomize(model, seed=zlib.crc32(f"{family}/{task}/{problem_type}/{num_labels}".encode()))
    if task == "token-classification":
        with torch.no_grad():
            model.classifier.bias[0] -= 2.0  # fewer "O" tokens: more entities to group
    model.eval()
    folder = _root() / f"{family}-{task}-{problem_type}-{num_labels}"
    model.save_pretrained(folder)
    _, hf_tok = family_tokenizer(family)
    hf_tok.save_pretrained(folder)
    return folder, model, hf_tok
