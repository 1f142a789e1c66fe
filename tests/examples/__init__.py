"""Tests that run each example for a few steps."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples")


def load_example(name: str) -> ModuleType:
    """``examples/<name>.py`` imported as a module (its ``main`` is not run)."""
    spec = importlib.util.spec_from_file_location(f"{name}_example", os.path.join(EXAMPLES, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
