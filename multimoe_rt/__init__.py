"""multimoe_rt: serve several fine-tuned variants of one MoE LLM from one shared expert slab.

Public API: ``from_pretrained`` (a MultiVariantModel over variant directories), ``patch``
(slab-backed experts inside a loaded transformers model) and ``runtime_info``.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Importing ops defines the torch.library custom ops torch.ops.multimoe_rt.{align, fused_moe} (and loads
# the C++ extension's ops when it was built), so other runtimes can call them after `import multimoe_rt`.
from . import ops  # noqa: E402,F401
from . import families  # noqa: E402


def runtime_info() -> dict:
    """Which backends are active here and why: the first thing to look at when something is slow."""
    import torch

    from . import _ext

    triton_ok, triton_why = ops.triton_status()
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "backends": {
            "torch": (True, "always available"),
            "triton": (triton_ok, triton_why),
            "reference": (True, "float64, for tests"),
        },
        "cpp_extension": (_ext.available, _ext.reason),
        "cuda_ops": (_ext.has_cuda_ops, "built with CUDA sources" if _ext.has_cuda_ops else
                     "extension built without CUDA (no CUDA in this PyTorch build)"),
        "default_backend": ops.choose_backend(torch.device("cuda" if cuda else "cpu")),
        # model families and the routes each supports (multimoe_rt/families.py, README "Model families")
        "families": {name: f.support() for name, f in families.FAMILIES.items()},
    }


def from_pretrained(*args, **kwargs):
    """A MultiVariantModel over variant directories (see ``MultiVariantModel.from_pretrained``); also
    registers the ``multimoe`` experts implementation with transformers (idempotent)."""
    from .model import MultiVariantModel

    register_experts_implementation()
    return MultiVariantModel.from_pretrained(*args, **kwargs)


def register_experts_implementation() -> bool:
    """Make ``experts_implementation="multimoe"`` selectable in transformers models."""
    from .integrations.hf import register

    return register()


def patch(*args, **kwargs):
    from .integrations.hf import patch as _patch

    return _patch(*args, **kwargs)
