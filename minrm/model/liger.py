"""Liger's fused Triton kernels swapped into the loaded reward-model backbone.

Liger (github.com/linkedin/Liger-Kernel) replaces a decoder's RMSNorm, gated MLP (SwiGLU, or
GEGLU for Gemma) and rotary embedding with Triton kernels that fuse the elementwise work into one
pass and recompute small intermediates in backward instead of storing them: shorter steps and
less activation memory. Its cross-entropy kernels are never used: a reward model has no LM head.

The trainer calls `apply_liger_kernel` after loading the `*ForSequenceClassification` model and
before `fully_shard`. Which kernels an architecture gets is Liger's own choice (the defaults of its
`apply_liger_kernel_to_<model_type>` functions: e.g. no RoPE for DeepSeek or GLM-4, no SwiGLU for
gpt-oss). What the swap touches:
- Norm and MLP modules (MoE experts included) of this model keep their class, parameters and names;
  Liger binds its own `forward` onto each instance (Nemotron's parameter-free ReLU² activation module
  is replaced whole). State-dict keys do not change, so FSDP2 (which shards per decoder
  layer and only wraps that layer), gradient checkpointing (which re-runs the layer's forward),
  distributed checkpoints and the Hugging Face export all see the same model.
- RoPE is not a module: attention calls the function `apply_rotary_pos_emb` of its modeling module
  (e.g. `transformers.models.llama.modeling_llama`) by name at every call, so Liger replaces it
  there, which switches it for every model of that architecture in the process. Liger also points
  that module's norm/MLP class names at its own classes, so a model of the same architecture built
  later in the process is built with Liger modules.
"""

import inspect
import re
import sys

import torch
from transformers import PreTrainedModel


def apply_liger_kernel(model: PreTrainedModel, use: bool | None, strict: bool, device: torch.device) -> str:
    """Swap Liger's kernels into `model` if wanted and possible; return one line for the log.

    `use` is --use_liger_kernel: None (auto) means on exactly when `device` is a CUDA GPU. When the
    kernels are wanted but cannot be used (no CUDA, or an architecture Liger does not cover), the
    model is left unchanged and the returned line says why; with `strict` (--strict_kernels) that
    line is raised as an error instead, so the run fails at start rather than running slower.
    """
    if use is None and device.type != "cuda":
        return f"liger: off (auto: the device is {device.type}, Liger's Triton kernels need a CUDA GPU)"
    if use is False:
        return "liger: off (--use_liger_kernel false); the model keeps its Hugging Face modules"
    problem = _why_not(model, device)
    if problem is None:
        swapped = swap_liger_kernels(model)
        if swapped:
            return _describe(model, swapped)
        problem = f"liger: Liger's patch for model type {_decoder(model).config.model_type!r} swapped no kernel"
    if strict:
        raise RuntimeError(f"{problem}. Pass --use_liger_kernel false, or drop --strict_kernels to run without.")
    return f"{problem}; running without Liger (the model is unchanged)"


def swap_liger_kernels(model: PreTrainedModel, **liger_flags: bool) -> dict[str, list[str]]:
    """Apply Liger's instance patch for the model's architecture, on any device; return what is swapped.

    `liger_flags` override Liger's per-architecture kernel choice (the CPU tests swap RoPE alone with
    `rms_norm=False, swiglu=False, geglu=False`). The result maps each Liger kernel to where it now runs (see `liger_kernels_in`).
    """
    # Imported here: it pulls in Triton and every modeling module Liger patches (seconds), which
    # runs without Liger do not need.
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance

    decoder = _decoder(model)
    # Liger's patch functions look for the layers under `getattr(model, model.base_model_prefix, model)`,
    # and several accept only their own *ForCausalLM or *Model class, not a *ForSequenceClassification:
    # all but Nemotron's take the bare decoder, so the score head and the wrapper are out of their
    # reach. Nemotron's reads `model.model.layers` (to swap its MLP activation), so it gets the wrapper.
    target = model if decoder.config.model_type == "nemotron" else decoder
    _apply_liger_kernel_to_instance(target, cross_entropy=False, fused_linear_cross_entropy=False, **liger_flags)
    return liger_kernels_in(model)


def liger_kernels_in(model: PreTrainedModel) -> dict[str, list[str]]:
    """Map each Liger kernel found in `model` to the module paths (or module-level function) it runs as.

    Read from the model itself, not from what was asked for: a Liger class, a Liger `forward` bound
    on a module instance, or a Liger function in the decoder's modeling module (RoPE).
    """
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        bound = module.__dict__.get("forward")
        if type(module).__module__.startswith("liger_kernel"):
            kernel = type(module).__name__
        elif bound is not None and bound.__module__.startswith("liger_kernel"):
            kernel = bound.__qualname__.split(".")[0]  # "LigerRMSNorm.forward" -> "LigerRMSNorm"
        else:
            continue
        found.setdefault(kernel, []).append(name)
    modeling = sys.modules[type(_decoder(model)).__module__]
    for attr, value in vars(modeling).items():
        if inspect.isfunction(value) and value.__module__.startswith("liger_kernel"):
            found.setdefault(value.__name__, []).append(f"{modeling.__name__}.{attr}")
    return found


def _decoder(model: PreTrainedModel) -> PreTrainedModel:
    """The decoder stack under the score head. Multimodal wrappers (Gemma 3, Qwen 3.5) keep it as
    `language_model`, whose config names the text model type that Liger patches."""
    base = model.base_model
    return getattr(base, "language_model", base)


def _why_not(model: PreTrainedModel, device: torch.device) -> str | None:
    """Why Liger's kernels cannot be used for this model on this device, or None if they can."""
    if device.type != "cuda":
        return (
            f"liger: --use_liger_kernel asked for Liger's kernels but the device is {device.type}: "
            "they are Triton kernels that need a CUDA GPU"
        )
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        return f"liger: liger-kernel cannot be imported ({e})"
    decoder = _decoder(model)
    if not type(decoder).__module__.startswith("transformers."):
        return f"liger: {type(decoder).__name__} is remote code; Liger patches only transformers' own models"
    model_type = decoder.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        covered = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        return f"liger: the installed liger-kernel has no kernels for model type {model_type!r} (it covers: {covered})"
    return None


def _describe(model: PreTrainedModel, swapped: dict[str, list[str]]) -> str:
    """One log line: each kernel, how many modules it runs in, and where (layer indices folded to *)."""
    parts = []
    for kernel, where in swapped.items():
        places = dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".*", w) for w in where)
        parts.append(f"{kernel} x{len(where)} ({', '.join(places)})")
    line = f"liger: {type(model).__name__}: " + "; ".join(parts)
    if any(w.startswith("transformers.") for where in swapped.values() for w in where):
        line += f"; module-level swaps serve every {_decoder(model).config.model_type} model in this process"
    return line
