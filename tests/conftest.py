# Triton kernels are tested on CPU through the Triton interpreter. TRITON_INTERPRET must be set
# before any @triton.jit function is defined (i.e. before a kernels.*_triton module is imported),
# so it is set here, at conftest import time, ahead of every test module.
# STAGGER_TEST_DEVICE=cuda (tests/devices.py) compiles the kernels for real instead: the kernel
# wrappers a test module imports then run on the GPU with NaN-poisoned outputs.
import os
if os.environ.get("STAGGER_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise RuntimeError("STAGGER_TEST_DEVICE=cuda compiles kernels for real: unset TRITON_INTERPRET")

import pytest  # noqa: E402

import devices  # noqa: E402


@pytest.fixture(autouse=True)
def _kernels_on_test_device(request, monkeypatch):
    """GPU mode: every `*_triton` wrapper (and moe_align) a test_kernels_* module imported runs on
    the device. CPU mode: nothing changes."""
    mod = request.module
    if not devices.ON_GPU or not mod.__name__.split(".")[-1].startswith("test_kernels_"):
        yield
        return
    for name, obj in list(vars(mod).items()):
        if callable(obj) and (name.endswith("_triton") or name == "moe_align") and not name.startswith("_"):
            monkeypatch.setattr(mod, name, devices.on_device(obj))
    yield
