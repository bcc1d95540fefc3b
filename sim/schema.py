"""Schema hash: which checkpoints describe the same model.

sha256 over the canonical form: the model config with the FFN restored to its
base width (tier 0), plus the sorted (name, full shape, dtype) of every
parameter. Every tier and export of one model hashes alike; any change to the
architecture (hidden size, layers, heads, KV heads, base FFN width,
vocabulary, style, ...) changes it. The tier itself is never hashed.
"""
import dataclasses
import hashlib
import json

import torch

from sim.checkpoint import checkpoint_layout
from sim.config import ModelConfig
from sim.model import full_shapes


def schema_hash(cfg: ModelConfig, dtypes: dict[str, torch.dtype] | None = None) -> str:
    """`cfg` is the base (tier-0) config; `dtypes` the stored dtype per parameter (default float32)."""
    dtypes = dtypes or {}
    canonical = {
        "config": dataclasses.asdict(cfg),
        "parameters": sorted((name, list(shape), str(dtypes.get(name, torch.float32)).removeprefix("torch."))
                             for name, shape in full_shapes(cfg).items()),
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def checkpoint_schema_hash(directory) -> str:
    """Schema hash of a checkpoint directory, from its metadata and stored dtypes."""
    _, cfg, _, tensors = checkpoint_layout(directory)
    return schema_hash(cfg, {name: t.dtype for name, t in tensors.items()})
