"""Infinity's text side: flan-t5-xl's encoder and tokenizer from a local folder, used as the official script does.

Prompts are truncated to `max_tokens` (512) as the official script does; each prompt keeps its real tokens (the
closing `</s>` included) and the mask hides the rest. The official script pads every prompt to 512 tokens before the
encoder and then keeps only the real ones; here the batch is padded to its longest prompt only. The encoder's
attention masks padded keys out, so a real token's features are the same (to rounding) while a short prompt costs a
few dozen tokens of work, not 512. T5 runs in float16 on a GPU, as the official script loads it, and in float32 on
the CPU; its features are returned in float32.
"""

from pathlib import Path

import torch


class T5Text:
    def __init__(self, tokenizer, model, device: torch.device, max_tokens: int) -> None:
        self.tokenizer, self.model = tokenizer, model.to(device).eval().requires_grad_(False)
        self.device, self.max_tokens = device, max_tokens

    @classmethod
    def load(cls, folder: str, device: torch.device, max_tokens: int) -> "T5Text":
        from transformers import AutoTokenizer, T5EncoderModel

        if not (Path(folder) / "config.json").is_file():
            raise FileNotFoundError(f"text encoder folder {folder} has no config.json: expected a local copy of "
                                    "google/flan-t5-xl (config.json, weights and tokenizer files)")
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, legacy=True)
            model = T5EncoderModel.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot load the T5 text encoder from {folder}: {exc}") from exc
        return cls(tokenizer, model, device, max_tokens)

    @property
    def channels(self) -> int:
        return self.model.config.d_model

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, T, C) float32 and the mask of real tokens (B, T), cut to the longest prompt's T."""
        tokens = self.tokenizer(prompts, max_length=self.max_tokens, padding="longest", truncation=True,
                                return_tensors="pt")
        ids_BT, mask_BT = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        feats_BTC = self.model(input_ids=ids_BT, attention_mask=mask_BT).last_hidden_state.float()
        width = int(mask_BT.sum(dim=1).max())
        return feats_BTC[:, :width], mask_BT[:, :width].bool()
