"""The triton backend: one kernel per file, gathered under the backend interface of ``torch_backend``."""

from ippo.kernels.triton_influence import lora_token_influence, token_influence
from ippo.kernels.triton_sketch import project_rows, segment_sketch

__all__ = ["token_influence", "lora_token_influence", "project_rows", "segment_sketch"]
