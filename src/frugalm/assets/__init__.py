"""Files that ship inside the package: the built-in model, its held-out text, hardware profiles.

`scripts/build_default_model.py` rebuilds the first two.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = ASSETS_DIR / "default_model"
"""The built-in model (Hugging Face layout plus frugalm_build.json)."""
DEFAULT_EVAL_PATH = ASSETS_DIR / "default_eval.txt"
"""The built-in model's held-out evaluation text."""
PROFILES_PATH = ASSETS_DIR / "profiles.yaml"
"""The built-in hardware profiles."""
