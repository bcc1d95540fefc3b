"""matsim: a verification harness for heterogeneous MatFormer training."""
from sim.errors import AlignmentError, ConfigError, ShapeMismatch, SimError, UnsupportedParameter

__all__ = ["SimError", "ConfigError", "UnsupportedParameter", "ShapeMismatch", "AlignmentError"]
