"""Configuration of the `hart` backend: where the three official folders are, and the official sampler's switches.

Sizes are not configured here: they come from the folders' own config.json files (see `folders.py`). Folders
take a local path, an s3:// or an hf:// URI; `storage.checkpoints.localize_checkpoints` fetches URIs into the node's
checkpoint cache before the backend is built, and the backend reads local folders only.
"""

from typing import Literal

from pydantic import Field

from sparsevar.config import StrictModel, cuda_graphs_field


class HartConfig(StrictModel):
    backend: Literal["hart"] = "hart"
    llm: str = Field(description="the transformer folder, hart-0.7b-1024px/llm (config.json, ema_model.bin)")
    tokenizer: str = Field(description="the hybrid tokenizer folder, hart-0.7b-1024px/tokenizer")
    text_encoder: str = Field(description="the Qwen2 text encoder folder, a local Qwen2-VL-1.5B-Instruct")
    ema: bool = Field(True, description="load llm/ema_model.bin as the official sample.py does; false: the "
                                        "folder's plain model weights")
    system_prompt: bool = Field(True, description="encode prompts after the official system prompt, as "
                                                  "sample.py does (use_llm_system_prompt)")
    more_smooth: bool = Field(True, description="Gumbel-softmax token embeddings, on in the official sampler")
    cuda_graphs: bool = cuda_graphs_field()

    def checkpoints(self) -> dict[str, tuple[str, str | None, int | None]]:
        """Checkpoint fields to resolve to local paths: field -> (uri, sha256, size); folders carry neither."""
        return {"llm": (self.llm, None, None), "tokenizer": (self.tokenizer, None, None),
                "text_encoder": (self.text_encoder, None, None)}
