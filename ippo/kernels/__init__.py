"""Influence kernels: per-episode LoRA gradient . validation gradient, without per-episode gradients.

Backends: ``torch`` (reference, any device), ``triton`` (default on CUDA), ``cuda`` (CUDA C++ from csrc/).
Choose with IPPO_BACKEND; ``python -m ippo.info`` lists what runs here and why not.
"""

from ippo.kernels.ops import gradient_sketches, influence_scores, segment_lora_gradients, sketch_lora_gradient
from ippo.kernels.scorer import (
    InfluenceScorer,
    LoRAGrad,
    check_validation_gradient,
    differentiable_weights,
    lora_weights,
    segment_ids_from_mask,
    sketch_gradients,
    sketch_layer_index,
    validation_gradients,
)

__all__ = ["InfluenceScorer", "LoRAGrad", "check_validation_gradient", "differentiable_weights", "gradient_sketches",
           "influence_scores", "lora_weights", "segment_ids_from_mask", "segment_lora_gradients", "sketch_gradients",
           "sketch_layer_index", "sketch_lora_gradient", "validation_gradients"]
