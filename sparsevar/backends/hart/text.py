"""Prompt encoding as the official `encode_prompts` does it, with the Qwen2 model of a local folder.

Each prompt is padded (or cut) to exactly `context_token` tokens. With the system prompt on, the model reads
[system prompt, prompt] and only the prompt's positions are kept. The context is the last hidden state; the
position ids count real tokens (cumsum of the mask − 1), so padding repeats the last real position.
"""

from pathlib import Path

import torch

SYSTEM_PROMPT = """Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions \
suitable for image generation.

Examples:
- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in a round shape, sleeping peacefully on a \
warm sunny windowsill, surrounded by pots of blooming red flowers.
- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, a \
diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.

Please generate only the enhanced description for the prompt below and DO NOT include any additional sentences. \
Start your response with "Enhanced Prompt:".

User Prompt:
"""


class QwenTextEncoder:
    def __init__(self, tokenizer, model, tokens: int, system_prompt: bool, device: torch.device) -> None:
        """`tokenizer` and `model`: a transformers tokenizer and Qwen2 model (already on `device`)."""
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.tokens, self.device = tokens, device
        self.system_ids = None
        if system_prompt:
            self.system_ids = tokenizer(SYSTEM_PROMPT, return_tensors="pt", max_length=tokens,
                                        truncation=True).input_ids.to(device)

    @classmethod
    def load(cls, folder: Path, tokens: int, system_prompt: bool, device: torch.device,
             dtype: torch.dtype) -> "QwenTextEncoder":
        from transformers import AutoModel, AutoTokenizer

        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder / 'config.json'} is missing: model.text_encoder must point at a local "
                                    "Qwen2 folder (Qwen2-VL-1.5B-Instruct)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModel.from_pretrained(folder, dtype=dtype).to(device)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot load the Qwen2 text encoder from {folder} (model.text_encoder): {exc}") from None
        return cls(tokenizer, model, tokens, system_prompt, device)

    @property
    def width(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Context (B, T, width) float32 and position ids (B, T)."""
        ids_BT = self.tokenizer(prompts, return_tensors="pt", padding="max_length", max_length=self.tokens,
                                truncation=True).input_ids.to(self.device)
        mask_BT = ids_BT != self.tokenizer.pad_token_id
        position_ids_BT = torch.cumsum(mask_BT, dim=1) - 1
        if self.system_ids is None:
            hidden = self.model(ids_BT, attention_mask=mask_BT, output_hidden_states=True).hidden_states[-1]
        else:
            system_BS = self.system_ids.expand(len(prompts), -1)
            hidden = self.model(torch.cat([system_BS, ids_BT], dim=1),
                                attention_mask=torch.cat([torch.ones_like(system_BS, dtype=torch.bool), mask_BT], 1),
                                output_hidden_states=True).hidden_states[-1][:, system_BS.shape[1]:]
        return hidden.float(), position_ids_BT
