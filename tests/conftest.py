"""Suite-wide settings; helpers tests import live in tests/helpers.py."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
