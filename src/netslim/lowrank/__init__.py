"""Low-rank factorization: SVD, spatial separable split, CP and Tucker-2, with rank selection.

``decompose(model, example_input, DecomposeConfig(...))`` does it in one call (the ``decompose`` stage
is the same config); :func:`plan_decomposition` + :func:`apply_plan_` are the two steps inside it."""
from .api import DecomposeConfig, DecomposeResult, decompose
from .apply import DecompositionReport, apply_plan_, decompose_, plan_decomposition, select_rank
from .factorize import cp_conv, spatial_conv, svd_conv1x1, svd_linear, truncated_svd, tucker2_conv
from .ranks import rank_for_energy, vbmf_rank
from .refit import refit_
from .search import energy_rank_search, greedy_rank_search

__all__ = ["decompose", "DecomposeConfig", "DecomposeResult", "decompose_", "plan_decomposition", "apply_plan_",
           "select_rank", "DecompositionReport", "svd_linear", "svd_conv1x1", "spatial_conv", "cp_conv",
           "tucker2_conv", "truncated_svd", "rank_for_energy", "vbmf_rank", "greedy_rank_search",
           "energy_rank_search", "refit_"]
