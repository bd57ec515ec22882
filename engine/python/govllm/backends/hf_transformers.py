"""The "transformers" engine (``bridge.BACKENDS``); the backend itself is the ``hf`` package."""

from .hf.backend import ENGINE_NAME, WATCHDOG_INTERVAL_S, TransformersBackend, create
from .hf.compat import host_memory_probe as _host_memory_for_cpu_cache  # scripts/bench_transformers_gpu.py
from .hf.loading import load_model

__all__ = ["ENGINE_NAME", "WATCHDOG_INTERVAL_S", "TransformersBackend", "create", "load_model",
           "_host_memory_for_cpu_cache"]
