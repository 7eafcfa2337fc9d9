"""A tiny, randomly initialised BERT: fast unit tests and chaos runs that need no real encoder."""

from __future__ import annotations

from pathlib import Path

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def make_tiny_encoder(folder: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A randomly initialised 1-layer BERT with a character-level WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *CHARS, *("##" + c for c in CHARS),
             *".,:()-'!?&"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=2 * hidden,
                     max_position_embeddings=128)
    BertModel(cfg).save_pretrained(folder)
    return folder
