"""Compact and transferred filters, converted from a trained model: a k x k convolution becomes a
depthwise-separable block (MobileNet, Howard et al. 2017; Network Decoupling, Guo et al. 2018), a
blueprint-separable BSConv-U block (Haase & Amthor 2020), a fire module (SqueezeNet, Iandola et al. 2016)
or CReLU's half filters and their negations (Shang et al. 2016), each initialised from the layer's
weights in closed form and refit by least squares on training images (:mod:`netslim.refit`).

``replace(model, example_input, ReplaceConfig(...), calib_data=...)`` does it in one call (the
``replace`` stage is the same config); :func:`plan_replacement` / :func:`target_plan` +
:func:`apply_plan_` are the steps inside it."""
from .api import ReplaceConfig, ReplaceResult, replace, replace_
from .crelu import crelu, relu_follows
from .fire import fire
from .modules import Concat, NegConcat
from .plan import BLOCKS, LayerPlan, ReplacementPlan, apply_plan_, plan_replacement, target_plan
from .separable import bsconv_u, depthwise_separable

__all__ = ["replace", "replace_", "ReplaceConfig", "ReplaceResult", "plan_replacement", "target_plan", "apply_plan_",
           "ReplacementPlan", "LayerPlan", "BLOCKS", "depthwise_separable", "bsconv_u", "fire", "crelu",
           "relu_follows", "Concat", "NegConcat"]
