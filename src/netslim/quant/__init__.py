"""Quantization and weight sharing.

Weight sharing: k-means (Han et al. 2016), HashedNets and soft weight-sharing under a learned Gaussian
mixture prior (Ullrich et al. 2017, :func:`soft_weight_sharing_`). Bit-width reduction: post-training
quantization with calibrated ranges, CLE and bias correction, AdaRound (:func:`quantize`),
quantization-aware training with STE / LSQ / PACT, binary, ternary and INQ weights, mixed precision,
integer execution through QDQ ONNX in onnxruntime, and packed ``.nsq`` storage.
"""
from .calibrate import CALIBRATORS, RangeCollector, weight_range
from .export import onnx_qdq_bytes, ort_session, to_onnx_qdq
from .kmeans import SharedWeight, hash_layer_, kmeans_1d, share_layer_, share_weights_
from .lowbit import INQ, bake_lowbit_, inq_train, lowbit_layer_names, lowbit_weights_
from .mixed import layer_sensitivity, plan_bits
from .pack import load_quantized_, read_quantized, save_quantized
from .ptq import QuantConfig, calibrate_, prepare, quantize, set_mode
from .qat import quantization_aware_training
from .qspec import QuantSpec, fake_quantize, qparams
from .soft_sharing import (GaussianMixturePrior, SharingReport, SoftSharingConfig, SoftSharingHook,
                           mixture_neg_log_prob, soft_weight_sharing_)

__all__ = ["SharedWeight", "share_weights_", "share_layer_", "hash_layer_", "kmeans_1d",
           "SoftSharingConfig", "soft_weight_sharing_", "SharingReport", "GaussianMixturePrior", "SoftSharingHook",
           "mixture_neg_log_prob",
           "QuantConfig", "QuantSpec", "quantize", "prepare", "calibrate_", "set_mode", "fake_quantize", "qparams",
           "CALIBRATORS", "RangeCollector", "weight_range", "onnx_qdq_bytes", "to_onnx_qdq", "ort_session",
           "quantization_aware_training", "lowbit_weights_", "lowbit_layer_names", "bake_lowbit_", "inq_train", "INQ",
           "layer_sensitivity", "plan_bits", "save_quantized", "load_quantized_", "read_quantized"]
