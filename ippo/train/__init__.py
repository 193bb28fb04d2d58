"""Thin I-PPO trainer: tasks and checkers (``tasks``), PPO/GRPO/I-PPO math (``ppo_math``), model loading (``model``)."""
