"""Pruning: unstructured magnitude pruning with masks held as parametrizations (Han et al. 2015), and
structured pruning of whole channels through the dependency graph (:func:`structured`)."""
from .masks import MaskParametrization, apply_masks_, masked_modules, remove_masks_, sparsity
from .magnitude import magnitude_masks, magnitude_prune_
from .structured import structured

__all__ = ["MaskParametrization", "apply_masks_", "remove_masks_", "masked_modules", "sparsity",
           "magnitude_masks", "magnitude_prune_", "structured"]
