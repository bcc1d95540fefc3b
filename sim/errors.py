"""The one error hierarchy of matsim.

Every user-facing failure is a `SimError`, so the CLI can turn it into one
line and exit code 2, and callers can catch the whole family at once. Each
message names the bad value and what would have been valid.
"""


class SimError(Exception):
    """Base of every error matsim raises on purpose."""


class ConfigError(SimError, ValueError):
    """A config, tier, width or flag value that cannot describe a valid run."""


class UnsupportedParameter(SimError, ValueError):
    """A parameter name that has no MatFormer prefix dimension."""


class ShapeMismatch(SimError, ValueError):
    """Two shapes that alignment cannot reconcile."""


class AlignmentError(SimError, ValueError):
    """Helper-mode indices that cannot be placed (out of range, duplicate, wrong dtype)."""


class ChunkGridMismatch(AlignmentError):
    """A payload whose DCT blocks do not line up with the receiver's (COEFF_MEAN cannot mix them)."""


class CheckpointError(SimError):
    """A checkpoint that is missing, corrupt, or disagrees with its own metadata."""


class DoubleSlicingError(CheckpointError):
    """A sliced checkpoint asked to be sliced again (universal strategy at tier > 0)."""


class MissingTierCheckpoint(CheckpointError):
    """Psyche's MissingMatformerTierCheckpoint: the sliced strategy found no <checkpoint>-tier<t>."""
