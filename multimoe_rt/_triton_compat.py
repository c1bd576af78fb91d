"""Compatibility shim for Triton's CPU interpreter (``TRITON_INTERPRET=1``): tests and CPU dry runs only.

Triton < 3.8's interpreter implements ``tensor.__index__`` as ``int(self.handle.data)``, where ``data`` is a
one-element numpy array of shape (1,). numpy >= 2.4 refuses to convert an array with ndim > 0 to a Python
scalar (``TypeError: only 0-dimensional arrays can be converted to Python scalars``), so every kernel that
uses a runtime scalar as a ``range`` bound or an index fails under the interpreter (triton 3.6 is the GPU
image's version). Triton 3.8 squeezes first; this shim makes older versions do the same.

``apply_interpreter_shim()`` is idempotent and does nothing where it is not needed (triton >= 3.8, numpy
< 2.4, triton not installed, or an interpreter whose internals do not look as expected). It changes
nothing on the GPU path: the patched function is only called by the interpreter.
"""
from __future__ import annotations

import functools
import re

_applied: str | None = None


def _version(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", s)[:3])


def apply_interpreter_shim() -> str:
    """Patch triton's interpreter if this triton/numpy pair needs it; returns what was done (for logs)."""
    global _applied
    if _applied is not None:
        return _applied
    try:
        import numpy as np
        import triton
        from triton.runtime import interpreter
    except Exception as e:  # noqa: BLE001 - no triton or no numpy: nothing to patch
        _applied = f"not applied: {type(e).__name__}: {e}"
        return _applied
    if _version(triton.__version__) >= (3, 8) or _version(np.__version__) < (2, 4):
        _applied = f"not needed (triton {triton.__version__}, numpy {np.__version__})"
        return _applied
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_multimoe_shim", False):
        _applied = f"not applied: triton {triton.__version__}'s interpreter has no _patch_lang_tensor"
        return _applied

    def index(self):
        return int(self.handle.data.squeeze())

    @functools.wraps(original)
    def patched(tensor, *args, **kwargs):
        result = original(tensor, *args, **kwargs)
        scope = args[0] if args else kwargs.get("scope")
        if scope is not None and hasattr(scope, "set_attr"):
            scope.set_attr(tensor, "__index__", index)  # restored with the rest when the scope ends
        else:
            tensor.__index__ = index
        return result

    patched._multimoe_shim = True
    interpreter._patch_lang_tensor = patched
    _applied = f"applied: __index__ squeezes (triton {triton.__version__}, numpy {np.__version__})"
    return _applied
