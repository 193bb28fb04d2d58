"""The triton backend: one kernel per file, gathered under the backend interface of ``torch_backend``."""

from ippo.kernels.triton_influence import accumulate_token_scores
from ippo.kernels.triton_sketch import project_rows

__all__ = ["accumulate_token_scores", "project_rows"]
