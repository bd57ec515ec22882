"""LoRA adapters (--lora-modules) on the transformers backend, per token of a packed batch.

transformers' continuous batching packs every request of a step into one sequence, so PEFT's
``adapter_names`` (one adapter per batch *row*) cannot tell its requests apart. Instead each
adapter is read with PEFT (``LoraConfig.from_pretrained``, ``load_peft_weights``: its A, B and
scaling per target module) and applied by a forward hook on each target ``nn.Linear`` of the
plain model: before each forward, ``observe`` (called by the sampler's ``prepare_tensor_args``
with the step's requests, in packing order) records which token span belongs to which adapter,
and the hook adds ``B(A(x[span])) * scaling`` to the span's output, as PEFT's LoRA layer adds it.
A batch of base requests only pays one Python check per target module; a mixed batch computes
each adapter's update on its own spans only, so a step may mix any number of adapters; the
cost of a step is its base forward plus, per target module, one small matmul pair per span of
adapter tokens. ``max_loras`` (vLLM's name) is accepted and only logged when a step mixes more.

What needs disabling while adapters are loaded (the backend does it): block (prefix) sharing
(a cached prompt block from the base model is not the adapter's), CUDA graphs and async batching
(the hooks change per step and read host state).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ...backend import LoRAModule

log = logging.getLogger("govllm.transformers")

# PEFT's save_pretrained prefixes module names with this (PeftModel.base_model.model).
_PEFT_PREFIX = "base_model.model."


class AdapterWeights:
    """One adapter's update per target module: name -> (A, B, scaling)."""

    def __init__(self, module: LoRAModule, layers: dict[str, tuple[Any, Any, float]]) -> None:
        self.module = module
        self.layers = layers


def load_adapter(module: LoRAModule, model: Any, device: str, dtype: Any) -> AdapterWeights:
    """Read a PEFT LoRA adapter for ``model``; ValueError for what this loader does not apply
    (DoRA, biases, per-module ranks or alphas, modules_to_save, fan_in_fan_out, non-Linear targets)."""
    import torch
    from peft import LoraConfig
    from peft.utils import load_peft_weights

    cfg = LoraConfig.from_pretrained(module.path)
    unsupported = {
        "use_dora": bool(getattr(cfg, "use_dora", False)),
        "bias": getattr(cfg, "bias", "none") != "none",
        "lora_bias": bool(getattr(cfg, "lora_bias", False)),
        "rank_pattern": bool(getattr(cfg, "rank_pattern", None)),
        "alpha_pattern": bool(getattr(cfg, "alpha_pattern", None)),
        "modules_to_save": bool(getattr(cfg, "modules_to_save", None)),
        "fan_in_fan_out": bool(getattr(cfg, "fan_in_fan_out", False)),
    }
    bad = sorted(k for k, v in unsupported.items() if v)
    if bad:
        raise ValueError(f"LoRA adapter {module.name} ({module.path}) uses {', '.join(bad)}, which the "
                         "transformers backend does not apply: use --engine vllm, or an adapter without them")
    scaling = cfg.lora_alpha / (math.sqrt(cfg.r) if getattr(cfg, "use_rslora", False) else cfg.r)
    state = load_peft_weights(module.path, device="cpu")
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        name = key.removeprefix(_PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if name.endswith(marker):
                pairs.setdefault(name[: -len(marker)], {})[part] = tensor
                break
        else:
            raise ValueError(f"LoRA adapter {module.name}: unexpected tensor {key}")
    modules = dict(model.named_modules())
    layers: dict[str, tuple[Any, Any, float]] = {}
    for name, ab in sorted(pairs.items()):
        target = modules.get(name)
        if not isinstance(target, torch.nn.Linear):
            raise ValueError(f"LoRA adapter {module.name}: {name} is not a Linear module of this model")
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"LoRA adapter {module.name}: {name} lacks lora_A or lora_B")
        a, b = ab["lora_A"], ab["lora_B"]
        if a.shape[1] != target.in_features or b.shape[0] != target.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"LoRA adapter {module.name}: {name} has shapes {tuple(a.shape)}, {tuple(b.shape)} "
                             f"for a {target.in_features}->{target.out_features} layer")
        layers[name] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype), float(scaling))
    if not layers:
        raise ValueError(f"LoRA adapter {module.name} ({module.path}) has no LoRA weights")
    return AdapterWeights(module, layers)


class LoRARouter:
    """The adapters of one model and the token spans of the current step that use each."""

    def __init__(self, adapters: list[AdapterWeights], max_loras: int = 0) -> None:
        self.adapters = adapters
        self.index = {a.module.name: i + 1 for i, a in enumerate(adapters)}  # 0: the base model
        self.max_loras = max_loras or len(adapters)
        # The current step: (start, end, adapter index >= 1) of each span, adjacent spans merged.
        self.spans: list[tuple[int, int, int]] = []
        self.error: str | None = None
        self._handles: list[Any] = []

    def install(self, model: Any) -> None:
        """Hook every target module of any adapter."""
        modules = dict(model.named_modules())
        names = sorted({n for a in self.adapters for n in a.layers})
        for name in names:
            per_adapter = [(i + 1, a.layers[name]) for i, a in enumerate(self.adapters) if name in a.layers]
            self._handles.append(modules[name].register_forward_hook(self._hook(dict(per_adapter))))
        log.info("LoRA: %d adapter(s) on %d modules (%s), up to %d per step", len(self.adapters), len(names),
                 ", ".join(a.module.name for a in self.adapters), self.max_loras)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def observe(self, segments: list[tuple[int, int]]) -> None:
        """The step's packing: (query tokens, adapter index) of each request, in order."""
        spans: list[tuple[int, int, int]] = []
        pos = 0
        used: set[int] = set()
        for length, adapter in segments:
            if adapter and length > 0:
                used.add(adapter)
                if spans and spans[-1][1] == pos and spans[-1][2] == adapter:
                    spans[-1] = (spans[-1][0], pos + length, adapter)
                else:
                    spans.append((pos, pos + length, adapter))
            pos += length
        if len(used) > self.max_loras:
            # More adapters than one step may mix: each still gets its own (correct) update; the
            # bound is a memory knob, so it is logged, not enforced mid-step.
            log.debug("LoRA: %d adapters in one step, above max_loras %d", len(used), self.max_loras)
        self.spans = spans

    def _hook(self, weights: dict[int, tuple[Any, Any, float]]) -> Any:
        import torch.nn.functional as F

        def hook(_module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            spans = self.spans
            if not spans:
                return output
            x = inputs[0]
            flat_x = x.reshape(-1, x.shape[-1])
            flat_out = output.view(-1, output.shape[-1])
            for start, end, adapter in spans:
                w = weights.get(adapter)
                if w is None or end > flat_x.shape[0]:
                    continue
                a, b, scaling = w
                flat_out[start:end] += F.linear(F.linear(flat_x[start:end], a), b) * scaling
            return output

        return hook
