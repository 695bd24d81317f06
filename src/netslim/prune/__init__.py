"""Pruning. Unstructured magnitude pruning with masks held as parametrizations (Han et al. 2015)."""
from .masks import MaskParametrization, apply_masks_, masked_modules, remove_masks_, sparsity
from .magnitude import magnitude_masks, magnitude_prune_

__all__ = ["MaskParametrization", "apply_masks_", "remove_masks_", "masked_modules", "sparsity",
           "magnitude_masks", "magnitude_prune_"]
