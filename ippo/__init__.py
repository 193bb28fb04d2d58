"""ippo: Influence-Guided PPO with fused influence kernels."""

__version__ = "0.1.0"
