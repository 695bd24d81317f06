"""Quantization and weight sharing. Today: k-means weight sharing (Han et al. 2016) and HashedNets."""
from .kmeans import SharedWeight, hash_layer_, kmeans_1d, share_layer_, share_weights_

__all__ = ["SharedWeight", "share_weights_", "share_layer_", "hash_layer_", "kmeans_1d"]
