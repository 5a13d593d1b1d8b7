"""flowgrad: gradient steering of frozen rectified-flow ODEs (FlowGrad, Liu et al., CVPR 2023)."""
__version__ = "0.1.0"
