"""The tiny backend's built-in text side: a byte-level tokenizer and a small transformer encoder."""

import torch
from torch import nn


class ByteTokenizer:
    """UTF-8 bytes shifted by one (0 is padding), cut to a maximum length: no vocabulary file to ship."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens

    def __call__(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, T) and a mask of real tokens (B, T); every text gets at least one token."""
        ids = [[b + 1 for b in text.encode("utf-8")[: self.max_tokens]] or [1] for text in texts]
        width = max(len(row) for row in ids)
        ids_BT = torch.zeros(len(ids), width, dtype=torch.long)
        for i, row in enumerate(ids):
            ids_BT[i, : len(row)] = torch.tensor(row)
        return ids_BT.to(device), (ids_BT > 0).to(device)


class TextEncoder(nn.Module):
    """Byte embeddings, learned positions and a few pre-norm transformer layers."""

    def __init__(self, dim: int, depth: int, heads: int, max_tokens: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(257, dim)
        self.pos = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        x_BTC = self.embed(ids_BT) + self.pos[: ids_BT.shape[1]]
        return self.norm(self.layers(x_BTC, src_key_padding_mask=~mask_BT))
