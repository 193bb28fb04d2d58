"""ippo: Influence-Guided PPO with fused influence kernels."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ippo")  # the one version source: pyproject.toml
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"
