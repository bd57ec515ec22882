"""The host's memory, for KV cache sizing on CPU."""

from __future__ import annotations

import os


def memory() -> tuple[int, int]:
    """(total, available) host memory in bytes: psutil's, else sysconf's."""
    try:
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)
    except (ImportError, OSError, AttributeError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40, 1 << 40
