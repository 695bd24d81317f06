"""netslim: make trained CNNs smaller and faster, and prove it with the survey's six ratios."""
from __future__ import annotations

__version__ = "0.1.0"

from . import data, zoo  # noqa: E402
from .errors import NetslimError  # noqa: E402
from .profile import Comparison, Profile, compare, profile  # noqa: E402
from .pipeline.compress import CompressResult, compress  # noqa: E402
from .saving import load, save  # noqa: E402
from .search import SearchConfig, auto_compress  # noqa: E402

__all__ = ["zoo", "data", "profile", "compare", "compress", "CompressResult", "save", "load", "Profile", "Comparison", "NetslimError",
           "auto_compress", "SearchConfig",            "__version__"]
