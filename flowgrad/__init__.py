"""flowgrad: gradient steering of frozen rectified-flow ODEs (FlowGrad, Liu et al., CVPR 2023).

Time convention: t in [0, 1], t = 0 is noise, t = 1 is data. Velocity fields are callables
``v(x, t)`` with x (B, C, H, W) in the model's data space and t (B,).
"""

from .backprop import ControlGradients, backward_sweep, control_gradients, loss_and_adjoint
from .grid import DEFAULT_EPS, TimeGrid
from .invert import invert, reconstruction_error, rmse
from .models import load_guidance_clip, load_model
from .optimize import FlowGradConfig, FlowGradResult, InitialPass, IterationInfo, initial_pass, optimize
from .segments import Segmentation, straightness, straightness_segments
from .trajectory import Trajectory, integrate, trajectory
from .velocity import Velocity, VelocityField, state_dict_fingerprint

__version__ = "0.1.0"

__all__ = [
    "ControlGradients", "DEFAULT_EPS", "FlowGradConfig", "FlowGradResult", "InitialPass", "IterationInfo",
    "Segmentation", "TimeGrid", "Trajectory", "Velocity", "VelocityField", "__version__",
    "backward_sweep", "control_gradients", "initial_pass", "integrate", "invert", "load_guidance_clip", "load_model",
    "loss_and_adjoint", "optimize",
    "reconstruction_error", "rmse", "state_dict_fingerprint", "straightness", "straightness_segments",
    "trajectory",
]
