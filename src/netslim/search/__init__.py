"""Cross-family compression search: one search over pruning, low-rank, compact filters and quantization,
per layer, against latency measured on the user's target (``netslim search`` / :func:`auto_compress`).

- :mod:`~netslim.search.cost`: targets with measured cost and the per-layer latency lookup table;
- :mod:`~netslim.search.space`: the knobs of one model;
- :mod:`~netslim.search.apply`: a candidate built through each family's public API;
- :mod:`~netslim.search.engine`: the cheap accuracy estimate, Optuna's NSGA-II and the greedy baseline;
- :mod:`~netslim.search.api`: :func:`auto_compress` and :class:`SearchConfig`.
"""
from .api import STRATEGIES, SearchConfig, SearchResult, auto_compress, pareto_front, parse_duration
from .cost import DEVICES, FORMULAS, Device, LatencyTable, Prediction, check_prediction, formula, measure_ms, parse_device
from .engine import Evaluator, Score, greedy_search, run_study
from .space import FAMILIES, Knob, SearchSpace, build_space

__all__ = ["auto_compress", "SearchConfig", "SearchResult", "STRATEGIES", "pareto_front", "parse_duration", "DEVICES",
           "FORMULAS", "Device", "LatencyTable", "Prediction", "check_prediction", "formula", "measure_ms",
           "parse_device", "Evaluator", "Score", "greedy_search", "run_study", "FAMILIES", "Knob", "SearchSpace",
           "build_space"]
