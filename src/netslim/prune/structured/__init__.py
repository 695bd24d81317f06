"""Structured pruning: whole filters and channels removed through the model's dependency graph.

``structured(model, example_input, ratio=0.5, criterion="l1")`` returns a dense, smaller model;
``save_pruned(model, path, arch="resnet56")`` / ``load_pruned(path)`` store and rebuild it without pickled code.
The pieces change independently (as in Torch-Pruning): :mod:`.graph` says what is coupled,
:mod:`.criteria` what matters, :mod:`.select` how much each layer keeps.
"""
from ...targets import parse_target
from .api import TARGET_METRICS, structured
from .apply import remove_groups_
from .criteria import CRITERIA, SlimmingRegularizer, group_scores
from .graph import DependencyGraph, trace
from .select import SCOPES, layer_groups
from .serialize import load_pruned, save_pruned

__all__ = ["structured", "trace", "DependencyGraph", "remove_groups_", "group_scores", "layer_groups",
           "CRITERIA", "SCOPES", "TARGET_METRICS", "SlimmingRegularizer", "parse_target", "save_pruned", "load_pruned"]
