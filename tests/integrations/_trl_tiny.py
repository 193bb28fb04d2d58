"""Tiny TRL set-ups for tests/integrations (imported by the tests and by the torchrun worker ``_trl_ddp_worker.py``):
a random float64 Qwen2 with peft LoRA, TRL configs and datasets, trainers that record what the I-PPO filter saw, and
the explicit per-row reference (one TRL loss per row, the other rows detached)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, RLOOConfig

from ippo.integrations.trl import IPPOConfig, IPPOGRPOTrainer, IPPORLOOConfig, IPPORLOOTrainer
from ippo.kernels import LoRAGrad, lora_weights
from ippo.testing import tiny_tokenizer

PROMPTS = ["1+1=", "2+3=", "7-4=", "9*1=", "5+5=", "8-2=", "3*3=", "6+1="]
VALIDATION = [{"prompt": "4+4=", "completion": "8"}, {"prompt": "9-3=", "completion": "6"},
              {"prompt": "2*4=", "completion": "8"}, {"prompt": "7+2=", "completion": "9"},
              {"prompt": "5-5=", "completion": "0"}, {"prompt": "3+3=", "completion": "6"}]
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tokenizer():
    return tiny_tokenizer()


def tiny_model(tok, seed: int = 0, targets=TARGETS, b_std: float = 0.3, **lora_kwargs):
    """A 2-layer float64 Qwen2 with LoRA (r=2) on ``targets``; lora_B drawn from N(0, b_std) so that dl/dA != 0."""
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float64)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        lora = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=list(targets), **lora_kwargs)
        model = get_peft_model(model, lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, b_std)
    return model


def perturb_adapter(model, seed: int = 5, std: float = 0.2) -> None:
    """Moves the trained ("default") adapter away from TRL's frozen "ref" copy: GRPO's KL term gets a gradient."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".default." in name and "lora_" in name:
                    p.add_(torch.randn_like(p) * std)


def reward(completions, **kwargs):
    """Deterministic, varied rewards, so that groups have non-zero advantages."""
    return [float(sum(map(ord, c)) % 5) for c in completions]


def train_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": (PROMPTS * 4)[:n]})


def validation_dataset() -> Dataset:
    return Dataset.from_list(VALIDATION)


def config(output_dir, cls=IPPOConfig, **overrides):
    base = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", bf16=False, fp16=False,
                gradient_checkpointing=False, max_completion_length=4, num_generations=2, per_device_train_batch_size=4,
                max_steps=1, logging_steps=1, save_strategy="no", seed=0, learning_rate=1e-2, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(overrides)
    return cls(**base)


def lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def load_lora_state(model, state) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def copy_batch(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in batch.items()}


def recording(base):
    """``base`` (an I-PPO trainer class) recording each filter call: the micro-batches before, the scores, the
    validation rows drawn and their gradient, the advantages after, and the state around the scoring pass (with
    random .grad installed on the LoRA weights during it). ``force_scores(scores, trainer)`` replaces the real scores
    after they are computed (the real scoring pass still runs)."""

    class Recording(base):
        def __init__(self, *args, force_scores=None, **kwargs):
            self.records, self.trained_advantages, self.force_scores = [], [], force_scores
            super().__init__(*args, **kwargs)

        def _ippo_filter(self, batches):
            model = self.accelerator.unwrap_model(self.model)
            lora = {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
            saved_grads = {n: p.grad for n, p in lora.items()}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(123)
                for p in lora.values():
                    p.grad = torch.randn_like(p)
            grads = {n: p.grad.clone() for n, p in lora.items()}
            record = {"step": self._step, "global_step": self.state.global_step,
                      "before": [copy_batch(b) for b in batches], "lora": lora_state(model),
                      "metrics": copy.deepcopy(dict(self._metrics["train"])), "rng": torch.get_rng_state(),
                      "grads": grads}
            self.records.append(record)
            super()._ippo_filter(batches)
            record["after"] = [b["advantages"].clone() for b in batches]
            record["after_tensors"] = [b["advantages"] for b in batches]
            record["lora_after"] = lora_state(model)
            record["grads_after"] = {n: p.grad.clone() for n, p in lora.items()}
            record["metrics_after"] = copy.deepcopy(dict(self._metrics["train"]))
            record["rng_after"] = torch.get_rng_state()
            for n, p in lora.items():
                p.grad = saved_grads[n]

        def _ippo_validation_indices(self, redraw=True):
            indices = super()._ippo_validation_indices(redraw)
            self.records[-1]["val_indices"] = list(indices)
            return indices

        def _ippo_scores(self, batches, val_grads):
            scores = super()._ippo_scores(batches, val_grads)
            self.records[-1]["scores"] = [s.clone() for s in scores]
            self.records[-1]["val_grads"] = {k: (v.A.clone(), v.B.clone()) for k, v in val_grads.items()}
            if self.force_scores is not None:
                scores = [self.force_scores(s, self) for s in scores]
            return scores

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.model.training and not self.ippo_stopped:  # a micro-batch that trains
                self.trained_advantages.append(inputs["advantages"])
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    Recording.__name__ = f"Recording{base.__name__}"
    return Recording


RecordingGRPO = recording(IPPOGRPOTrainer)
RecordingRLOO = recording(IPPORLOOTrainer)


def make_trainer(cls, output_dir, *, model=None, tok=None, config_cls=None, perturb=False, ippo=True, **overrides):
    """A trainer of class ``cls`` on the tiny model; ``overrides`` go to the config (an ``IPPOConfig``, or
    ``IPPORLOOConfig`` for an RLOO trainer: the ``ippo_*`` settings among them; with ``ippo=False``, for a plain TRL
    trainer, TRL's ``GRPOConfig`` / ``RLOOConfig``), except the trainer keywords (validation_dataset, reward_funcs,
    force_scores)."""
    tok = tok or tokenizer()
    model = model if model is not None else tiny_model(tok)
    trainer_keys = {"force_scores", "validation_dataset", "reward_funcs"}
    extra = {k: overrides.pop(k) for k in list(overrides) if k in trainer_keys}
    if ippo:
        extra.setdefault("validation_dataset", validation_dataset())
        # the tests here record and check the two-pass path's filter; test_integrations_trl_one_backward.py the other
        overrides.setdefault("ippo_one_backward", False)
    if config_cls is None:
        rloo = "RLOO" in cls.__name__
        config_cls = (IPPORLOOConfig if rloo else IPPOConfig) if ippo else (RLOOConfig if rloo else GRPOConfig)
    args = config(output_dir, cls=config_cls, **overrides)
    extra.setdefault("reward_funcs", reward)
    trainer = cls(model=model, args=args, train_dataset=train_dataset(overrides.get("n", 8)),
                  processing_class=tok, **extra)
    if perturb:
        perturb_adapter(trainer.model)
    return trainer


def float64_exact(trainer) -> None:
    """Test only: makes the tiny float64 model's training loss float64 throughout, so that two computations that
    differ only in where a float64 factor enters (the advantage weights before or after the backward) agree to
    float64 rounding. Three steps of it round in float32 whatever the model's dtype: TRL's per-token log-probs (its
    chunked LM-head kernel), replaced here by a log_softmax of the model's own logits; Qwen2's RMSNorm (it
    normalizes in float32), replaced by the same formula in the input's dtype; and TRL's advantages (float32, so the
    two-pass path's weighted advantages are rounded to float32), cast to float64. Through any of them the gradient of
    sum_i w_i l_i equals sum_i w_i dl_i/dtheta only to ~1e-7 relative."""

    def per_token(model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                  compute_aux_loss=False, **kwargs):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1:-1]
        logp = (logits / trainer.temperature).log_softmax(-1)
        token = logp.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
        return token, -(logp.exp() * logp).sum(-1) if compute_entropy else None, None

    def rms_norm(module):
        return lambda x: module.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)

    def float64_advantages(generate):
        return lambda *args, **kwargs: {**(out := generate(*args, **kwargs)),
                                        "advantages": out["advantages"].to(torch.float64)}

    trainer._get_per_token_logps_and_entropies = per_token
    trainer._generate_and_score_completions = float64_advantages(trainer._generate_and_score_completions)
    for module in trainer.model.modules():
        if type(module).__name__ == "Qwen2RMSNorm":
            module.forward = rms_norm(module)


class RowGate:
    """Calls ``model`` and detaches every row's per-token outputs except row ``row``: TRL's loss computed through it
    has the gradient of row ``row``'s share of that loss alone (rows do not interact in the forward)."""

    def __init__(self, model, row: int):
        self.model, self.row = model, row

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        for field in ("log_probs", "entropy"):
            value = getattr(out, field, None)
            if value is not None:
                keep = torch.zeros(value.shape[0], dtype=torch.bool, device=value.device)
                keep[self.row] = True
                setattr(out, field, torch.where(keep.view(-1, *[1] * (value.dim() - 1)), value, value.detach()))
        return out


def lora_params(model, layers) -> list[LoRAGrad]:
    """[LoRAGrad(lora_A weight, lora_B weight)] of the active adapter of each layer in ``layers`` (module names)."""
    weights = lora_weights(model)
    return [weights[n] for n in layers]


def row_gradients(trainer, batch, layers) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per row of ``batch``, {layer: (dl_i/dA, dl_i/dB)} over ``layers`` (zeros where l_i does not reach), by an
    explicit loop over rows, l_i = row i's share of TRL's own ``_compute_loss`` (TRL's metrics left as they were)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [w for pair in lora_params(model, layers) for w in pair]
    saved = copy.deepcopy(dict(trainer._metrics["train"]))
    out = []
    for row in range(batch["prompt_ids"].shape[0]):
        loss = trainer._compute_loss(RowGate(model, row), batch)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        out.append({layer: (grads[2 * i], grads[2 * i + 1]) for i, layer in enumerate(layers)})
    trainer._metrics["train"].clear()
    trainer._metrics["train"].update(saved)
    return out


def reference_scores(trainer, batch, val_grads, scale: float) -> torch.Tensor:
    """s_i = scale * <d l_i / d theta, V> by an explicit loop over rows, l_i from TRL's own ``_compute_loss``."""
    out = [sum((g * v).sum() for layer, pair in grads.items() for g, v in zip(pair, val_grads[layer])) * scale
           for grads in row_gradients(trainer, batch, list(val_grads))]
    return torch.stack([torch.as_tensor(s, dtype=torch.float64) for s in out])


def final_answer_positions(completion: str) -> list[int]:
    """The character positions (= token positions of the character tokenizer) of a completion's final answer: the
    text after its last '####', stripped."""
    answer = completion.split("####")[-1].strip()
    start = completion.rindex(answer)
    return list(range(start, start + len(answer)))


def reference_validation_gradients(model, tok, rows, layers,
                                   answer_only: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """d/dtheta of the mean NLL per gold completion token (temperature 1), by a plain forward per pair;
    ``answer_only``: per token of the final answers (:func:`final_answer_positions`) only."""
    params = [w for pair in lora_params(model, layers) for w in pair]
    total, tokens = 0.0, 0
    for row in rows:
        prompt = tok(text=row["prompt"])["input_ids"]
        completion = tok(text=row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        positions = final_answer_positions(row["completion"]) if answer_only else list(range(len(completion)))
        ids = torch.tensor([prompt + completion])
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1]
        nll = -torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
        total = total + nll[positions].sum()
        tokens += len(positions)
    grads = torch.autograd.grad(total / tokens, params)
    return {layer: (grads[2 * i], grads[2 * i + 1]) for i, layer in enumerate(layers)}


def pad_batches(batches: list[dict], pad_id: int) -> dict:
    """The rows of several micro-batches as one: prompts left-padded, completions right-padded, like TRL."""
    prompt_len = max(b["prompt_ids"].shape[1] for b in batches)
    completion_len = max(b["completion_ids"].shape[1] for b in batches)
    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if key in ("prompt_ids", "prompt_mask"):
            fill = pad_id if key == "prompt_ids" else 0
            values = [torch.nn.functional.pad(v, (prompt_len - v.shape[1], 0), value=fill) for v in values]
        elif isinstance(values[0], torch.Tensor) and values[0].dim() == 2:
            fill = pad_id if key == "completion_ids" else 0
            values = [torch.nn.functional.pad(v, (0, completion_len - v.shape[1]), value=fill) for v in values]
        if isinstance(values[0], torch.Tensor) and values[0].dim() >= 1:
            out[key] = torch.cat(values)
        else:
            out[key] = values[0]
    return out


def torchrun_workers(out, names, *args, worker: str = "_trl_ddp_worker.py") -> dict[str, list[dict]]:
    """Runs ``worker out *args`` (a script of tests/integrations) on 2 processes (torchrun, CPU, gloo); {run name:
    [rank 0's saved results, rank 1's]} for the runs ``names``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).resolve().parent / worker), str(out), *args], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return {name: [torch.load(Path(out) / f"{name}-rank{r}.pt", weights_only=False) for r in (0, 1)]
            for name in names}


def check_one_process_union(out, ranks: list[dict], **settings) -> None:
    """The 1-process filter (a ``RecordingGRPO`` with ``settings``) on the union of both ranks' rows of one
    generation batch (``ranks``: each rank's record of it) gives the ranks' validation gradient, scores and
    reweighted advantages."""
    trainer = make_trainer(RecordingGRPO, out, max_steps=1, **settings)
    load_lora_state(trainer.model, ranks[0]["lora"])
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    pad = trainer.processing_class.pad_token_id
    union = [pad_batches([ranks[0]["before"][k], ranks[1]["before"][k]], pad) for k in range(len(ranks[0]["before"]))]
    trainer._ippo_filter(union)
    single = trainer.records[0]
    # TRL's per-token log-probs are float32 (its fused LM head), and the padding differs between the runs: float32-level
    # agreement is all that float64 models get here.
    close = dict(rtol=2e-5)
    for layer, (va, vb) in single["val_grads"].items():
        torch.testing.assert_close(va, ranks[0]["val_grads"][layer][0], **close, atol=1e-6 * va.abs().max().item())
        torch.testing.assert_close(vb, ranks[0]["val_grads"][layer][1], **close, atol=1e-6 * vb.abs().max().item())
    for k, scores in enumerate(single["scores"]):
        want = torch.cat([ranks[0]["scores"][k], ranks[1]["scores"][k]])
        torch.testing.assert_close(scores, want, **close, atol=1e-5 * want.abs().max().item())
        want = torch.cat([ranks[0]["after"][k], ranks[1]["after"][k]])
        torch.testing.assert_close(single["after"][k], want, **close, atol=1e-5 * want.abs().max().item())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Autouse in every test module that imports it. The models here are tiny: one intra-op thread is fastest, and on
    a shared 2-core machine a second thread that waits for a busy core makes every small matmul wait too (observed:
    10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
