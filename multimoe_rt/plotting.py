"""Plots are optional: matplotlib comes with the ``plot`` extra, and every harness still writes its JSON without it."""

from __future__ import annotations


def pyplot(required_by: str | None = None):
    """``matplotlib.pyplot`` on the non-interactive Agg backend; None without matplotlib, or, when
    ``required_by`` names what needs it, a ``MultimoeError`` saying how to install it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if required_by is None:
            return None
        from .errors import MultimoeError

        raise MultimoeError(f"{required_by} needs matplotlib: pip install 'multimoe_rt[plot]'") from None
    return plt


NO_PLOT = "matplotlib is not installed: no plot (pip install 'multimoe_rt[plot]')"
