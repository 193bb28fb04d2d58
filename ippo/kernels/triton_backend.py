"""The triton backend under the interface of ``torch_backend``: ``triton_influence.py`` (token_influence,
lora_token_influence) and ``triton_sketch.py`` (project_rows, the fused segment_sketch)."""

from ippo.kernels.triton_influence import lora_token_influence, token_influence
from ippo.kernels.triton_sketch import project_rows, segment_sketch

__all__ = ["token_influence", "lora_token_influence", "project_rows", "segment_sketch"]
