"""The peer methods of benchmarks/baselines.py against the per-episode loop, in float64."""

import torch
from baselines import METHODS, full_row_losses
from conftest import DEVICE

from ippo.kernels import validation_gradients
from ippo.testing import lora_llama


def setup():
    torch.manual_seed(0)
    model = lora_llama(64, 3, hidden_size=32, intermediate_size=48, dtype=torch.float64, device=DEVICE)
    batch = (torch.randint(0, 64, (5, 12), device=DEVICE), torch.randn(5, dtype=torch.float64, device=DEVICE))
    val_loss = full_row_losses(model, torch.randint(0, 64, (3, 12), device=DEVICE),
                               torch.ones(3, dtype=torch.float64, device=DEVICE)).sum()
    return model, batch, validation_gradients(model, val_loss)


def test_exact_methods_match_the_loop(backend):
    model, batch, val = setup()
    reference = METHODS["per-episode loop"](model, batch, val)
    assert reference.abs().max() > 1e-3
    for name in ("scorer", "vmap per-sample", "ghost hooks"):
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(METHODS[name](model, batch, val), reference, rtol=1e-9, atol=1e-12, msg=name)


def test_hook_methods_leave_the_plain_gradients():
    model, batch, val = setup()
    full_row_losses(model, *batch).sum().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for name in ("ghost hooks", "logra hooks", "scorer"):
        model.zero_grad(set_to_none=True)
        METHODS[name](model, batch, val)
        for got, want in zip([p.grad for p in model.parameters() if p.requires_grad], plain):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=name)


def test_logra_estimate_is_unbiased_over_projection_seeds():
    model, batch, val = setup()
    reference = METHODS["per-episode loop"](model, batch, val)
    estimates = torch.stack([METHODS["logra hooks"](model, batch, val, k=4, seed=s) for s in range(200)])
    standard_error = estimates.std(0) / 200 ** 0.5
    assert ((estimates.mean(0) - reference).abs() <= 4 * standard_error).all()
