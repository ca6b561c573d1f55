"""glibc allocator settings for a long-running service that swaps models.

Each thread that allocates gets its own malloc arena, and freed model buffers stay in the arena
that held them. Measured by ``tools.bench_switch``: the service's resident memory climbs with
every hot reload under load. Capping the arenas (``mallopt(M_ARENA_MAX)``) at start-up and
returning free heap pages to the OS (``malloc_trim``) after a swap keep it flat. Both calls exist
only in glibc. Elsewhere (musl, macOS) they are no-ops that report ``False``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

_LOGGER = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # glibc malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    if not hasattr(lib, "malloc_trim") or not hasattr(lib, "mallopt"):
        return None
    lib.malloc_trim.argtypes = [ctypes.c_size_t]
    lib.malloc_trim.restype = ctypes.c_int
    lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.mallopt.restype = ctypes.c_int
    return lib


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas (call before threads start); ``count <= 0`` leaves the default."""
    lib = _libc()
    if count <= 0 or lib is None:
        return False
    ok = bool(lib.mallopt(_M_ARENA_MAX, count))
    _LOGGER.debug("malloc arenas capped at %d: %s", count, ok)
    return ok


def trim() -> bool:
    """Give free heap pages back to the OS; True when glibc released something."""
    lib = _libc()
    if lib is None:
        return False
    return bool(lib.malloc_trim(0))
