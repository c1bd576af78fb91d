"""The project's error classes, in one place.

Every error the package raises on purpose, for something a user or a file got wrong, is a
``MultimoeError``. Each class also derives from the builtin a caller would have caught before this
hierarchy existed (``ValueError``, ``RuntimeError``, ``KeyError``), so ``except ValueError`` keeps
working. Anything else that comes out (``TypeError``, ``IndexError``, ``AttributeError``) is a bug
of ours, not a message for the user.

    MultimoeError
    ├── CheckpointError (ValueError)   a checkpoint cannot be used: names the file, the tensor, expected vs found
    ├── PlanError (ValueError)         a plan cannot be made, read or applied: names the field
    ├── UnknownVariant (KeyError)      a variant name or index that the model does not serve
    ├── RequestError (ValueError)      a request rejected at submission; the engine keeps serving
    │   └── (engine.QueueFull)         the waiting queue is full
    ├── EngineClosed (RuntimeError)    submit() after shutdown()
    │   └── EngineDead                 the engine loop died: every waiting and later request fails with it
    ├── StepError (RuntimeError)       one stage of an engine step failed for this request; the engine goes on
    ├── SwitchError (RuntimeError)     a variant switch failed; the previous variant is still active
    └── UsageError (ValueError)        a command-line argument that cannot work (the CLI prints it in one line)

This module imports nothing from the package: every other module may import it.
"""

from __future__ import annotations


class MultimoeError(Exception):
    """Base class of every error multimoe_rt raises on purpose."""


class CheckpointError(MultimoeError, ValueError):
    """A checkpoint cannot be used; the message names the file, the tensor and what was expected vs found."""


class PlanError(MultimoeError, ValueError):
    """A plan cannot be made, loaded or applied; the message names the field and what was expected."""


class UnknownVariant(MultimoeError, KeyError):
    """A variant name or index this model does not serve."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class RequestError(MultimoeError, ValueError):
    """A request was rejected at submission (the engine keeps serving)."""


class EngineClosed(MultimoeError, RuntimeError):
    """submit() after shutdown(), or a queued request cancelled by shutdown(drain=False)."""


class EngineDead(EngineClosed):
    """The engine's loop died (a bug, or an error no step could contain): every waiting and later request
    fails with this, and ``Engine.health()`` reports the reason."""


class StepError(MultimoeError, RuntimeError):
    """One stage of an engine step (admission, set load, forward, sampling, emit, retire) failed for this
    request; the message names the stage and the cause. Other requests and the engine go on."""


class SwitchError(MultimoeError, RuntimeError):
    """A variant switch failed; the previously active variant is still active."""


class UsageError(MultimoeError, ValueError):
    """A command-line argument or option value that cannot work; the message names it and the fix."""
