"""Liger's fused Triton kernels (github.com/linkedin/Liger-Kernel) swapped into the loaded reward-model backbone
before `fully_shard`: RMSNorm, gated MLP and RoPE as Liger chooses per architecture (never its cross-entropy: a reward
model has no LM head). Modules keep their class, parameters and names (Liger binds its `forward` onto each instance),
so state-dict keys, FSDP2 units, gradient checkpointing, DCP and the export see the same model. RoPE and the norm/MLP
class names are swapped in the modeling module: they serve every model of that architecture built later.
"""

import inspect
import re

import torch
from transformers import PreTrainedModel


def apply_liger_kernel(model: PreTrainedModel, use: bool | None, strict: bool, device: torch.device) -> str:
    """Swap Liger's kernels into `model` if wanted (`use` None: on a CUDA device) and possible; return a log line.
    Wanted but not possible: the model is unchanged and the line says why, or with `strict` the run fails at start."""
    if use is None and device.type != "cuda":
        return f"liger: off (auto: the device is {device.type}, Liger's Triton kernels need a CUDA GPU)"
    if use is False:
        return "liger: off (--use_liger_kernel false); the model keeps its Hugging Face modules"
    problem = _why_not(model, device)
    if problem is None and (swapped := swap_liger_kernels(model)):
        return _describe(model, swapped)
    problem = problem or f"liger: Liger's patch for model type {_decoder(model).config.model_type!r} swapped no kernel"
    if strict:
        raise SystemExit(f"minrm: error: {problem}. Pass --use_liger_kernel false, or drop --strict_kernels.")
    return f"{problem}; running without Liger (the model is unchanged)"


def swap_liger_kernels(model: PreTrainedModel, **liger_flags: bool) -> dict[str, list[str]]:
    """Apply Liger's instance patch for the model's architecture, on any device; return `liger_kernels_in`.
    `liger_flags` override Liger's kernel choice (e.g. `rms_norm=False, swiglu=False, geglu=False`)."""
    # Imported here: it pulls in Triton and every modeling module Liger patches (seconds).
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
    """Each Liger kernel in `model` (a Liger class, a Liger `forward` bound on an instance, or a Liger function
    in the decoder's modeling module: RoPE) mapped to the module paths or module-level function it runs as."""
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        bound = module.__dict__.get("forward")
        if type(module).__module__.startswith("liger_kernel"):
            found.setdefault(type(module).__name__, []).append(name)
        elif bound is not None and bound.__module__.startswith("liger_kernel"):
            found.setdefault(bound.__qualname__.split(".")[0], []).append(name)  # of "LigerRMSNorm.forward"
    modeling = inspect.getmodule(type(_decoder(model)))
    for attr, value in vars(modeling).items():
        if inspect.isfunction(value) and value.__module__.startswith("liger_kernel"):
            found.setdefault(value.__name__, []).append(f"{modeling.__name__}.{attr}")
    return found


def _decoder(model: PreTrainedModel) -> PreTrainedModel:
    """The decoder stack under the score head. Multimodal wrappers (Gemma 3, Qwen 3.5) keep it as
    `language_model`, whose config names the text model type that Liger patches."""
    return getattr(model.base_model, "language_model", model.base_model)


def _why_not(model: PreTrainedModel, device: torch.device) -> str | None:
    """Why Liger's kernels cannot be used for this model on this device, or None if they can."""
    if device.type != "cuda":
        why = "they are Triton kernels that need a CUDA GPU"
        return f"liger: --use_liger_kernel asked for Liger's kernels but the device is {device.type}: {why}"
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
