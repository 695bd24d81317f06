"""Knowledge distillation: a student learns from a teacher's outputs, features or relations, and peers
learn from each other.

* :func:`distill` - train a student with any mix of KD, FitNets, AT, FSP, SP, NST, RKD, PKT and CRD
  losses on :func:`netslim.train.fit` (:mod:`.losses` holds the losses, :mod:`.features` the
  forward hooks and adapters).
* :func:`mutual_learning` - deep mutual learning of 2+ peers; :func:`codistill` - codistillation
  of the models of DDP workers (:mod:`.online`).
* the ``distill`` recipe stage (:mod:`.stages`), and ``finetune: {distill: {kd: 1.0}}``.
"""
from .distiller import (LOSSES, DistillationLoss, DistillHook, DistillResult, Features, agreement, distill,
                        validate_losses)
from .features import FeatureTap, get_layer, layer_names, make_adapter, match_spatial
from .losses import (ATLoss, CRDLoss, FitNetLoss, FSPLoss, KDLoss, NSTLoss, PKTLoss, RKDLoss, SPLoss, kd_loss,
                     rkd_angle, rkd_distance)
from .online import codistill, mutual_learning

__all__ = ["distill", "agreement", "mutual_learning", "codistill", "DistillResult", "DistillationLoss",
           "DistillHook", "Features", "LOSSES", "validate_losses", "FeatureTap", "get_layer", "layer_names",
           "make_adapter", "match_spatial", "kd_loss", "KDLoss", "FitNetLoss", "ATLoss", "FSPLoss", "SPLoss",
           "NSTLoss", "RKDLoss", "rkd_distance", "rkd_angle", "PKTLoss", "CRDLoss"]
