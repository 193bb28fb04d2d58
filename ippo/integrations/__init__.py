"""Integrations of the I-PPO filter with other trainers. Each lives in its own submodule and imports its framework
only when that submodule is imported (``import ippo`` and ``import ippo.kernels`` never import them):

* ``ippo.integrations.trl``: ``IPPOGRPOTrainer`` and ``IPPORLOOTrainer``, TRL's GRPO and RLOO trainers with the
  I-PPO filter, configured by ``IPPOConfig`` / ``IPPORLOOConfig`` (TRL's configs plus the ``ippo_*`` fields,
  ``ippo.integrations.trl_config``); install the extra: ``pip install -e ".[trl]"``.
"""
