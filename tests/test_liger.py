"""Tests of `minrm.model.liger`: Liger's kernels swapped into tiny reward models.

- Structure (CPU, in this process), for every architecture Liger covers that has a
  `*ForSequenceClassification` class: after the swap the norms and MLPs run Liger's `forward` and the
  modeling module's `apply_rotary_pos_emb` is Liger's; the score head and embeddings are the same
  objects with the same weights; parameters and state-dict keys are unchanged. Liger's swaps of
  module-level names (RoPE, class names, ACT2FN) are undone after each test by `module_level_swaps_undone`.
- Numerics on CPU, under Triton's interpreter (TRITON_INTERPRET=1, read by `triton.jit` when Liger's
  kernels are defined at import, so in a subprocess: `python tests/test_liger.py interpreter`). With
  triton 3.9 and liger-kernel 0.8.5 only Liger's RoPE kernel runs there: RMSNorm and SwiGLU call
  `.to()` on scalar arguments that the interpreter passes as Python floats (AttributeError), and
  GEGLU's tanh comes back as None (TypeError). So on CPU the RoPE swap alone is compared with Hugging
  Face's code: rewards and gradients of three architectures, and 4 training steps under FSDP2
  (`fully_shard` per layer, one process, gloo) with gradient checkpointing, to torch's fp32
  tolerance (rtol 1.3e-6, atol 1e-5; they agree to 1e-9 or exactly).
- Numerics on GPU (skipped without CUDA): every kernel swapped vs none, rewards and gradients in
  fp32 and bf16, and 10 training steps under FSDP2 with bf16 mixed precision and gradient
  checkpointing; tolerances in `GPU_TOL`.
"""

import contextlib
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from transformers.activations import ACT2FN

from minrm.model.liger import apply_liger_kernel, liger_kernels_in, swap_liger_kernels

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------------
# Tiny models: 2 layers, width 32, with the few per-architecture fields that keep them tiny

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=128,
    pad_token_id=0,
)
_MOE = dict(num_experts=4, num_local_experts=4, moe_intermediate_size=32, num_experts_per_tok=2)
_MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8)
_MLA |= dict(v_head_dim=8, n_routed_experts=4, moe_intermediate_size=32, num_experts_per_tok=2)
_MLA |= dict(first_k_dense_replace=1, n_group=1, topk_group=1)  # layer 0 dense, layer 1 MoE
_LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2)
_LINEAR_ATTENTION |= dict(linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
EXTRA = {
    "deepseek_v2": _MLA,
    "deepseek_v3": _MLA,
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),
    "hunyuan_v1_moe": _MOE,
    "mixtral": _MOE,
    "qwen3_moe": _MOE,
    "qwen3_next": _MOE | _LINEAR_ATTENTION | dict(shared_expert_intermediate_size=32),
    "qwen3_5": _LINEAR_ATTENTION,
    "qwen3_5_text": _LINEAR_ATTENTION,
}
# Multimodal classifiers (a text decoder beside a vision tower): TINY goes to the text config.
VISION = {
    "gemma3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28),
    "qwen3_5": dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32),
}

# What Liger swaps into the 2-layer model of each architecture (its own per-architecture choice):
# kernel -> how many places. Functions (liger_rotary_pos_emb*) replace a modeling module's
# `apply_rotary_pos_emb`. Not swapped, by Liger's choice: RoPE of DeepSeek, GLM-4, Qwen3-Next and
# Qwen3.5 (partial or interleaved rotary); gpt-oss's clamped SwiGLU experts; the q/k norms of OLMo 2/3
# and Hunyuan; Qwen3-Next's gated norm; Nemotron gets only its ReLU² activation.
EXPECTED = {
    "deepseek_v2": {"LigerRMSNorm": 9, "LigerQwen3MoeSwiGLUMLP": 2, "LigerExperts": 1},
    "deepseek_v3": {"LigerRMSNorm": 9, "LigerQwen3MoeSwiGLUMLP": 2, "LigerExperts": 1},
    "exaone4": {"LigerRMSNorm": 9, "LigerSwiGLUMLP": 2, "liger_rotary_pos_emb": 1},
    "gemma": {"LigerGEGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "gemma2": {"LigerGEGLUMLP": 2, "LigerRMSNorm": 9, "liger_rotary_pos_emb": 1},
    "gemma3": {"LigerRMSNorm": 13, "LigerGEGLUMLP": 2, "liger_rotary_pos_emb": 1},
    "gemma3_text": {"LigerRMSNorm": 13, "LigerGEGLUMLP": 2, "liger_rotary_pos_emb": 1},
    "glm4": {"LigerPhi3SwiGLUMLP": 2, "LigerRMSNorm": 9},
    "gpt_oss": {"LigerRMSNorm": 5, "liger_rotary_pos_emb_gpt_oss": 1},
    "hunyuan_v1_dense": {"LigerHunyuanV1SwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "hunyuan_v1_moe": {"LigerExperts": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "llama": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "ministral": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "mistral": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "mixtral": {"LigerExperts": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "nemotron": {"LigerReLUSquared": 2},
    "olmo2": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "olmo3": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "phi3": {"LigerPhi3SwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "qwen2": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
    "qwen3": {"LigerRMSNorm": 9, "LigerSwiGLUMLP": 2, "liger_rotary_pos_emb": 1},
    "qwen3_5": {"LigerQwen3MoeSwiGLUMLP": 2, "LigerRMSNorm": 7},
    "qwen3_5_text": {"LigerQwen3MoeSwiGLUMLP": 2, "LigerRMSNorm": 7},
    "qwen3_moe": {"LigerRMSNorm": 9, "LigerExperts": 2, "liger_rotary_pos_emb": 1},
    "qwen3_next": {"LigerExperts": 2, "LigerQwen3MoeSwiGLUMLP": 2, "LigerRMSNorm": 7},
    "smollm3": {"LigerSwiGLUMLP": 2, "LigerRMSNorm": 5, "liger_rotary_pos_emb": 1},
}
# Text architectures for the numerical checks: plain SwiGLU, GEGLU with (1 + w) norms, q/k norms,
# fused gate_up projection, mixture of experts, gpt-oss's own RoPE layout.
NUMERIC = ["llama", "gemma2", "qwen3", "phi3", "mixtral", "gpt_oss"]
INTERPRETED = ["llama", "gemma2", "gpt_oss"]  # RoPE only (see the docstring), in its two layouts
# On GPU, per dtype: rewards rtol = atol, gradients' relative L2 error, training losses rtol = atol.
# Uncalibrated: no GPU was at hand when they were set (bf16 carries ~3 significant digits).
GPU_TOL = {
    torch.float32: dict(rewards=1e-4, grads=1e-4, losses=1e-3),
    torch.bfloat16: dict(rewards=5e-2, grads=5e-2, losses=5e-2),
}
# Liger's fused MoE kernel multiplies fp32 in TF32 (Triton's default for tl.dot): ~1e-3 relative.
FP32_MOE_TOL = 5e-3


def tiny_model(model_type: str) -> PreTrainedModel:
    """A seeded 2-layer reward model; its score head drawn as minrm draws it, so rewards are O(1)."""
    torch.manual_seed(0)
    if model_type in VISION:
        text = TINY | EXTRA.get(model_type, {})
        config = AutoConfig.for_model(model_type, text_config=text, vision_config=VISION[model_type], num_labels=1)
    else:
        config = AutoConfig.for_model(model_type, num_labels=1, **(TINY | EXTRA.get(model_type, {})))
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1 / math.sqrt(config.get_text_config().hidden_size + 1))
    return model


def pairs(generator: torch.Generator, n_pairs: int = 2, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, T) token ids, chosen rows then rejected rows, right-padded with 0 at random lengths; and the mask."""
    ids = torch.randint(1, TINY["vocab_size"], (2 * n_pairs, length), generator=generator)
    lengths = torch.randint(length // 2, length + 1, (2 * n_pairs, 1), generator=generator)
    mask = (torch.arange(length) < lengths).long()
    return ids * mask, mask


def pairwise_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Bradley-Terry loss and the rewards: HF's score at the last non-pad token of each row."""
    rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()  # (2B,)
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean(), rewards


def rewards_and_grads(model: PreTrainedModel, device: str = "cpu") -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Rewards and parameter gradients on a fixed batch, and the loss (its graph tells which kernels ran)."""
    ids, mask = pairs(torch.Generator().manual_seed(0))
    model.zero_grad()
    loss, rewards = pairwise_loss(model, ids.to(device), mask.to(device))
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return rewards.detach(), grads, loss


def autograd_nodes(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind `t`."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def assert_grads_close(grads: dict, expected: dict, rel: float) -> None:
    """Each gradient within `rel` of the expected one in relative L2 norm (robust to near-zero entries)."""
    for name, g in expected.items():
        err = (grads[name] - g).norm().item()
        assert err <= rel * g.norm().item() + 1e-12, f"{name}: |dg| = {err:.3g}, |g| = {g.norm().item():.3g}"


@contextlib.contextmanager
def module_level_swaps_undone() -> Iterator[None]:
    """Restore every loaded `transformers` module's names (and the shared ACT2FN table) on exit.

    Liger swaps `apply_rotary_pos_emb`, norm/MLP class names and ACT2FN entries at module level, for the
    whole process; undone, later tests build and run plain Hugging Face models.
    """
    saved = {name: dict(vars(m)) for name, m in list(sys.modules.items()) if name.startswith("transformers")}
    saved_act = {key: dict.__getitem__(ACT2FN, key) for key in ACT2FN}  # its [] instantiates
    try:
        yield
    finally:
        for name, names in saved.items():
            module = sys.modules[name]
            for attr in set(vars(module)) - set(names):
                delattr(module, attr)
            for attr, value in names.items():
                if vars(module).get(attr) is not value:
                    setattr(module, attr, value)
        for key in set(ACT2FN) - set(saved_act):
            del ACT2FN[key]
        ACT2FN.update(saved_act)


def liger_object(name: str):
    """The Liger class or function called `name`."""
    from liger_kernel.transformers import geglu, relu_squared, rms_norm, rope, swiglu

    return next(getattr(m, name) for m in (rms_norm, swiglu, geglu, relu_squared, rope) if hasattr(m, name))


# ----------------------------------------------------------------------------------------------
# Structure, on CPU


def test_table_lists_every_covered_architecture():
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES as SEQ_CLS

    covered = {t for t in MODEL_TYPE_TO_APPLY_LIGER_FN if t in SEQ_CLS}
    assert covered <= set(EXPECTED), f"add these to EXPECTED (and to the docs): {sorted(covered - set(EXPECTED))}"


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_swap_puts_liger_in_the_backbone_only(model_type):
    model = tiny_model(model_type)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    embed, score = model.get_input_embeddings(), model.score
    embed_weight, score_weight = embed.weight.detach().clone(), score.weight.detach().clone()
    with module_level_swaps_undone():
        kernels = swap_liger_kernels(model)
        assert {kernel: len(places) for kernel, places in kernels.items()} == EXPECTED[model_type]
        for kernel, places in kernels.items():
            for place in places:
                if place.startswith("transformers."):  # RoPE: a function of the modeling module
                    module_name, attr = place.rsplit(".", 1)
                    assert getattr(sys.modules[module_name], attr) is liger_object(kernel)
                else:  # a Liger forward bound on the module, or a Liger module in its place
                    assert model.get_submodule(place).forward.__func__ is liger_object(kernel).forward, place
    assert model.get_input_embeddings() is embed and model.score is score
    assert "forward" not in vars(embed) and "forward" not in vars(score)
    assert torch.equal(embed.weight, embed_weight) and torch.equal(score.weight, score_weight)
    assert list(model.state_dict()) == keys
    assert all(p is params[name] for name, p in model.named_parameters())


def test_model_built_after_a_swap_keeps_the_state_dict_keys():
    """Liger re-points the module's class names, so a model of the same architecture built later in the
    process (a reload, an export check) is made of Liger modules: with the same parameter names."""
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    model = tiny_model("llama")
    with module_level_swaps_undone():
        swap_liger_kernels(model)
        later = tiny_model("llama")
        assert type(later.model.norm) is LigerRMSNorm
        assert list(later.state_dict()) == list(model.state_dict())
        later.load_state_dict(model.state_dict(), strict=True)


def test_log_line_says_what_runs_where():
    model = tiny_model("llama")
    with module_level_swaps_undone():
        # A device of type cuda is all the gate looks at; the swap itself runs anywhere.
        line = apply_liger_kernel(model, use=True, strict=True, device=torch.device("cuda"))
    assert line == (
        "liger: LlamaForSequenceClassification: LigerSwiGLUMLP x2 (model.layers.*.mlp); "
        "LigerRMSNorm x5 (model.layers.*.input_layernorm, model.layers.*.post_attention_layernorm, model.norm); "
        "liger_rotary_pos_emb x1 (transformers.models.llama.modeling_llama.apply_rotary_pos_emb); "
        "module-level swaps serve every llama model in this process"
    )


@pytest.mark.parametrize("use", [None, False])
def test_off_leaves_the_model_alone(use):
    model = tiny_model("llama")
    line = apply_liger_kernel(model, use=use, strict=True, device=torch.device("cpu"))
    assert line.startswith("liger: off") and liger_kernels_in(model) == {}


@pytest.mark.parametrize(
    ("model_type", "device", "reason"),
    [
        ("llama", "cpu", "need a CUDA GPU"),
        ("gpt2", "cuda", "no kernels for model type 'gpt2'"),
        ("remote", "cuda", "RemoteLlamaModel is remote code"),
    ],
)
def test_kernels_that_cannot_run_are_refused(model_type, device, reason):
    if model_type == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=128, num_labels=1)
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = tiny_model("llama")
    if model_type == "remote":  # a decoder class from outside transformers, as trust_remote_code loads
        model.model.__class__ = type("RemoteLlamaModel", (type(model.model),), {})
    line = apply_liger_kernel(model, use=True, strict=False, device=torch.device(device))
    assert reason in line and "running without Liger" in line
    assert liger_kernels_in(model) == {}
    with pytest.raises(SystemExit, match=reason):
        apply_liger_kernel(model, use=True, strict=True, device=torch.device(device))


# ----------------------------------------------------------------------------------------------
# Numerics: training helpers (CPU and GPU), and the CPU check under Triton's interpreter (a subprocess)


def train_losses(model_type: str, device: str, dtype: torch.dtype, liger: dict | None, steps: int = 10) -> list[float]:
    """`steps` AdamW steps of the pairwise loss, as the trainer runs them: gradient checkpointing,
    the kernels swapped (with `liger` flags; None: not at all), then FSDP2 per layer and at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = tiny_model(model_type).to(device)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if liger is not None:
        assert swap_liger_kernels(model, **liger)
    mesh = init_device_mesh(device, (1,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.base_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5)
    generator = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids, mask = pairs(generator)
        loss, _ = pairwise_loss(model, ids.to(device), mask.to(device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def compare_training(device: str, dtype: torch.dtype, liger: dict, steps: int, **tol: float) -> None:
    """Unswapped run first: the swap of `apply_rotary_pos_emb` is module-level, for every later model."""
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    reference = train_losses("llama", device, dtype, liger=None, steps=steps)
    swapped = train_losses("llama", device, dtype, liger=liger, steps=steps)
    print(f"losses without Liger {reference}\nlosses with Liger    {swapped}")
    torch.testing.assert_close(torch.tensor(swapped), torch.tensor(reference), **tol)
    dist.destroy_process_group()


def check_under_interpreter() -> None:
    """Run by `test_rope_matches_under_triton_interpreter` with TRITON_INTERPRET=1."""
    only_rope = dict(rms_norm=False, swiglu=False, geglu=False)
    for model_type in INTERPRETED:
        model = tiny_model(model_type)
        ref_rewards, ref_grads, _ = rewards_and_grads(model)  # before the module-level swap
        kernels = swap_liger_kernels(model, **only_rope)
        assert list(kernels) == [k for k in EXPECTED[model_type] if k.startswith("liger_rotary")], kernels
        rewards, grads, loss = rewards_and_grads(model)
        assert "LigerRopeFunctionBackward" in autograd_nodes(loss), model_type  # Liger's kernel did run
        torch.testing.assert_close(rewards, ref_rewards, msg=lambda m, t=model_type: f"{t}: {m}")
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, msg=lambda m, t=model_type, n=name: f"{t} {n}: {m}")
        print(f"{model_type}: rewards and gradients match, max |dr| {(rewards - ref_rewards).abs().max():.1e}")
    compare_training("cpu", torch.float32, liger=only_rope, steps=2)  # torch's fp32 defaults; the interpreter is slow


def test_rope_matches_under_triton_interpreter():
    # One thread: OpenMP's spinning threads slow tiny matmuls badly on a small, busy machine.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "interpreter"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


# ----------------------------------------------------------------------------------------------
# Numerics on GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", NUMERIC)
def test_rewards_and_grads_match_on_gpu(model_type, dtype):
    tol = GPU_TOL[dtype]
    if dtype is torch.float32 and "LigerExperts" in EXPECTED[model_type]:
        tol = dict.fromkeys(tol, FP32_MOE_TOL)
    model = tiny_model(model_type).to("cuda", dtype)
    ref_rewards, ref_grads, _ = rewards_and_grads(model, "cuda")
    with module_level_swaps_undone():
        swap_liger_kernels(model)
        rewards, grads, _ = rewards_and_grads(model, "cuda")
    torch.testing.assert_close(rewards, ref_rewards, rtol=tol["rewards"], atol=tol["rewards"])
    assert_grads_close(grads, ref_grads, tol["grads"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_matches_on_gpu(dtype):
    """10 steps under FSDP2 (in a subprocess: its own process group), bf16 as the trainer's mixed precision."""
    cmd = [sys.executable, __file__, "gpu-training", dtype]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


if __name__ == "__main__":  # the subprocess cases: python tests/test_liger.py interpreter | gpu-training DTYPE
    if sys.argv[1] == "interpreter":
        check_under_interpreter()
    else:
        dtype = getattr(torch, sys.argv[2])
        tol = GPU_TOL[dtype]["losses"]
        compare_training("cuda", dtype, liger={}, steps=10, rtol=tol, atol=tol)
