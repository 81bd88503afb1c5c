"""Convert a Hugging Face BERT / sentence-transformers folder to a GGUF `bert` model.

The output matches llama.cpp's convert_hf_to_gguf.py for BERT: the same tensor names, layouts and types, and
the same metadata keys and values. Tensors are streamed one at a time (memory ≈ the largest tensor) into a
`.part` file that is renamed over `out_path` only when complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import gguf
import numpy as np

from models.convert.bert_config import BertHParams, load_bert_hparams
from models.convert.bert_tensors import PlannedTensor, plan_tensors
from models.convert.errors import ConversionError
from models.convert.gguf_keys import ADD_TOKEN_KEYS, NORMALIZER_LOWERCASE, NORMALIZER_STRIP_ACCENTS, SPECIAL_ID_KEYS
from models.convert.gguf_vocab import GgufVocab, build_gguf_vocab
from models.convert.model_card import add_model_card
from models.convert.pooling import read_pooling_type
from models.convert.pre_tokenizer_id import pre_tokenizer_name
from models.convert.safetensors_source import list_tensors, load_float
from models.convert.special_vocab import SpecialVocab, load_special_vocab
from models.convert.tensor_types import OutType, encode, stored_nbytes
from models.convert.tokenizer_files import load_wordpiece_tokenizer

logger = logging.getLogger(__name__)

ARCH = "bert"


def _add_hparams(
    w: gguf.GGUFWriter, hp: BertHParams, outtype: OutType, pooling: gguf.PoolingType | None
) -> None:
    w.add_block_count(hp.block_count)
    w.add_context_length(hp.context_length)
    w.add_embedding_length(hp.embedding_length)
    w.add_feed_forward_length(hp.feed_forward_length)
    w.add_head_count(hp.head_count)
    w.add_layer_norm_eps(hp.layer_norm_eps)
    w.add_file_type(outtype.file_type)
    w.add_causal_attention(False)  # an encoder: every token attends to every token
    if pooling is not None:
        w.add_pooling_type(pooling)
    if hp.classifier_labels:
        w.add_classifier_output_labels(list(hp.classifier_labels))


def _add_tokenizer(w: gguf.GGUFWriter, hp: BertHParams, vocab: GgufVocab, pre: str, special: SpecialVocab) -> None:
    w.add_token_type_count(hp.type_vocab_size)
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    for typ, tid in special.token_ids.items():
        if typ in SPECIAL_ID_KEYS:
            w.add_uint32(SPECIAL_ID_KEYS[typ], tid)
    for typ, flag in special.add_token.items():
        if typ in ADD_TOKEN_KEYS:
            w.add_bool(ADD_TOKEN_KEYS[typ], flag)
    if special.chat_template is not None:
        w.add_chat_template(special.chat_template)
    if special.normalizer_lowercase is not None:
        w.add_bool(NORMALIZER_LOWERCASE, bool(special.normalizer_lowercase))
    if special.normalizer_strip_accents is not None:
        w.add_bool(NORMALIZER_STRIP_ACCENTS, bool(special.normalizer_strip_accents))


def _write_tensors(w: gguf.GGUFWriter, plan: list[PlannedTensor]) -> None:
    for t in plan:
        data = encode(load_float(t.source), t.qtype)
        if data.nbytes != stored_nbytes(t.shape, t.qtype):
            raise ConversionError(f"internal error: {t.name} encoded to {data.nbytes} bytes")
        w.write_tensor_data(data)


def convert(src_dir: Path, out_path: Path, outtype: str = "f16") -> None:
    """Convert the BERT model in `src_dir` to a GGUF file at `out_path`.

    `outtype` is the type of the 2-D weight matrices: "f32", "f16" or "q8_0" (norms, biases and the
    position / token-type embeddings always stay f32). Raises `ConversionError` (a `ValueError`) for an
    unsupported or incomplete folder; nothing is left at `out_path` then.
    """
    start = time.perf_counter()
    src_dir, out_path = Path(src_dir), Path(out_path)
    ot = OutType.parse(outtype)
    if not src_dir.is_dir():
        raise ConversionError(f"not a model folder: {src_dir}")

    hp = load_bert_hparams(src_dir)
    tok = load_wordpiece_tokenizer(src_dir)
    vocab = build_gguf_vocab(tok, hp.vocab_size)
    special = load_special_vocab(src_dir, len(vocab.tokens))
    pooling = read_pooling_type(src_dir)
    plan = plan_tensors(list_tensors(src_dir), hp, ot)
    total_params = sum(int(np.prod(t.shape, dtype=np.int64)) for t in plan)

    w = gguf.GGUFWriter(path=None, arch=ARCH)
    # Key order follows llama.cpp's converter: type, model card, hyper-parameters, quant version, tokenizer.
    w.add_type(gguf.GGUFType.MODEL)
    add_model_card(w, src_dir, total_params)
    _add_hparams(w, hp, ot, pooling)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, hp, vocab, pre_tokenizer_name(tok), special)
    for t in plan:
        # the dtype argument only matters for uint8 (pre-quantized bytes); shapes here are logical
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), stored_nbytes(t.shape, t.qtype), raw_dtype=t.qtype)

    part = out_path.with_name(out_path.name + ".part")
    try:
        w.write_header_to_file(part)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        _write_tensors(w, plan)
        w.close()
        os.replace(part, out_path)
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    logger.info(
        "wrote %s: %d tensors, %d params, %s, %d bytes in %.2fs",
        out_path, len(plan), total_params, ot.value, out_path.stat().st_size, time.perf_counter() - start,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ollama-pyrunner convert",
        description="Convert a Hugging Face BERT / sentence-transformers folder to GGUF (architecture bert).",
    )
    p.add_argument("src_dir", type=Path, help="folder with config.json, model.safetensors, tokenizer.json/vocab.txt")
    p.add_argument("out_path", type=Path, help="the .gguf file to write")
    p.add_argument("--outtype", choices=[t.value for t in OutType], default="f16", help="weight type (default f16)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return p


def main(argv: list[str] | None = None) -> int:
    """`ollama-pyrunner convert SRC_DIR OUT.gguf [--outtype f16|f32|q8_0]`; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        convert(args.src_dir, args.out_path, args.outtype)
    except (ConversionError, OSError) as e:
        logger.error("conversion failed: %s", e)
        return 1
    return 0
