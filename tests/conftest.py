"""Shared pytest setup: Triton runs in its interpreter on machines without CUDA, and tests marked
``gpu`` are skipped there. TRITON_INTERPRET must be set before anything imports triton."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from multimoe_rt._triton_compat import apply_interpreter_shim

    apply_interpreter_shim()  # triton < 3.8 with numpy >= 2.4 (the GPU image's triton 3.6)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---- small zoo (checkpoint helper): built once per session; reuses $MULTIMOE_CACHE when set
@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory):
    """{"mixtral": {name: Path}, "switch": {name: Path}} of the --small zoo (base first)."""
    from multimoe_rt.lab import zoo

    cache = os.environ.get("MULTIMOE_CACHE") or tmp_path_factory.mktemp("zoo_cache")
    return {"mixtral": zoo.build("mixtral-tiny", small=True, cache_dir=cache, progress=False),
            "switch": zoo.build("switch-tiny", small=True, cache_dir=cache, progress=False)}


@pytest.fixture
def reload_settings(monkeypatch):
    """multimoe_rt.config reads the environment once: a test that changes it calls this to re-read, and
    the cached settings are dropped afterwards (re-read lazily, after monkeypatch restores the env)."""
    from multimoe_rt import config

    config.settings()
    yield config.reload
    config.settings.cache_clear()
