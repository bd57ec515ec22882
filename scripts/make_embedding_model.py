"""Write a small BERT-shaped embedding model with seeded random weights, offline.

The checkpoint is what vLLM's pooling runner (``BertModel`` -> ``BertEmbeddingModel``) and the
transformers backend's ``AutoModel`` path both read: ``config.json`` + ``model.safetensors``, a
WordPiece ``tokenizer.json`` built here from a small vocabulary with the ``tokenizers`` library
(BERT normalizer and pre-tokenizer, ``[CLS] $A [SEP]``), and a sentence-transformers pooling
config (``modules.json``: Transformer, mean Pooling, Normalize). The config declares Matryoshka
dimensions (``matryoshka_dimensions``), so ``dimensions`` can be tested. The same seed writes
the same weights, so tests may regenerate it at setup.

Usage: make_embedding_model.py --out DIR [--seed N] [--max-position-embeddings N]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import string

HIDDEN = 64
MATRYOSHKA_DIMENSIONS = [16, 32, 64]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """the a an and or of to in on at for with is are was be it this that as by from not no yes
i you he she we they my your our their what which who when where why how all any some each more most
other such only own same so than too very can will just do does did have has had go goes went come
came make made take took see saw know knew get got give gave find found think thought tell told
cat dog bird fish tree sun moon star sky sea river road city house home car book word text model
vector embedding token language machine learning data time day night year world people good bad new
old big small long short high low hello goodbye please thank thanks quick brown fox jumps over lazy
red green blue black white one two three four five six seven eight nine ten""".split()


def vocabulary() -> list[str]:
    """Special tokens, single characters and their continuations, then whole words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = SPECIALS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    seen: set[str] = set()
    return [t for t in vocab if not (t in seen or seen.add(t))]


def write_tokenizer(out: pathlib.Path, max_len: int) -> int:
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "do_lower_case": True,
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]"}, indent=2))
    return len(vocab)


def write_pooling(out: pathlib.Path, max_len: int) -> None:
    """sentence-transformers' module list: mean pooling, then L2 normalisation."""
    (out / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": HIDDEN, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": True}, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_len, "do_lower_case": False}))


def write(out: pathlib.Path, seed: int, max_len: int) -> None:
    import torch
    from transformers import BertConfig, BertModel

    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(out, max_len)
    write_pooling(out, max_len)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=max_len, type_vocab_size=2, pad_token_id=0,
        architectures=["BertModel"], matryoshka_dimensions=MATRYOSHKA_DIMENSIONS,
    )
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=False).to(torch.float32)
    # BERT's init leaves LayerNorms at 1/0 and biases at 0: perturb every parameter so that a
    # pooling or masking mistake changes the vectors.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-position-embeddings", type=int, default=128,
                        help="the model's context (max_model_len); small so that a too-long input is cheap")
    args = parser.parse_args()
    write(args.out, args.seed, args.max_position_embeddings)


if __name__ == "__main__":
    main()
