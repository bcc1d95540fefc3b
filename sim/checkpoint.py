"""Checkpoints: a directory with model.safetensors + config.json (HF fields plus
`matformer_tier` and `matformer_base_intermediate_size`). Never pickle.

A sliced checkpoint (tier t > 0) stores only the first I >> t FFN neurons and
says so in config.json, whose `intermediate_size` is the stored width, so HF
reads it as an ordinary narrower model. Load strategies:
- auto (default): sliced when the metadata says so; without metadata, when the
  stored FFN tensors are narrower than config.json's intermediate_size;
- sliced: hold the checkpoint's tensors as stored; the requested tier may be
  narrower (run through views) but not wider;
- universal: a full checkpoint, kept whole and run at the requested tier
  (the peer holds the suffix, so helper mode can work). On a sliced
  checkpoint at tier > 0 that would slice twice: DoubleSlicingError.

Saves are atomic: the new checkpoint is written beside the old one and swapped
in by renames, so an interrupted save leaves the previous checkpoint loadable.
"""
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sim.config import ModelConfig
from sim.errors import CheckpointError, ConfigError, DoubleSlicingError
from sim.model import MatFormerLM, default_device, load_prefix
from sim.tiers import tier_width, width_tier

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "model.safetensors", "config.json"
LOAD_STRATEGIES = ("auto", "sliced", "universal")


@dataclass(frozen=True)
class LoadInfo:
    """What loading decided, for the startup summary and for logs."""
    checkpoint: str
    strategy: str            # as requested
    resolved: str            # "sliced" or "universal"
    sliced: bool             # the checkpoint stores a prefix only
    stored_tier: int
    requested_tier: int
    effective_tier: int
    base_intermediate_size: int
    helper_mode: bool
    helper_reason: str

    @property
    def ffn_width(self) -> int:
        return self.base_intermediate_size >> self.effective_tier


# --- saving ---------------------------------------------------------------

def checkpoint_config(model: MatFormerLM) -> dict:
    """config.json for a model's stored weights: HF fields + MatFormer metadata."""
    tiers = set(model.stored_tiers)
    if len(tiers) != 1:
        raise CheckpointError(f"stored per-layer tiers {list(model.stored_tiers)} differ: a checkpoint stores "
                              f"one FFN width (save the full model, or export one tier)")
    tier = tiers.pop()
    hf = model.cfg.to_hf_dict()
    hf.update(intermediate_size=model.cfg.intermediate_size >> tier, matformer_tier=tier,
              matformer_base_intermediate_size=model.cfg.intermediate_size)
    return hf


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(model: MatFormerLM, directory: str | Path) -> Path:
    """Write `model`'s stored weights and metadata to `directory`, atomically."""
    directory = Path(directory)
    staging, backup = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".bak")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()}
    _fsync_write(staging / WEIGHTS, safetensors.torch.save(tensors, metadata={"format": "pt"}))
    _fsync_write(staging / CONFIG, json.dumps(checkpoint_config(model), indent=2, sort_keys=True).encode())
    if directory.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.rename(directory, backup)
    os.rename(staging, directory)
    shutil.rmtree(backup, ignore_errors=True)
    return directory


# --- reading --------------------------------------------------------------

def _resolve(directory: str | Path) -> Path:
    directory = Path(directory)
    backup = directory.with_name(directory.name + ".bak")
    if not directory.exists() and backup.is_dir():
        log.warning("checkpoint %s is missing but %s is intact (a save was interrupted): loading that", directory, backup)
        return backup
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint path {str(directory)!r} does not exist or is not a directory: "
                              f"expected a directory with {WEIGHTS} and {CONFIG}")
    for required in (WEIGHTS, CONFIG):
        if not (directory / required).is_file():
            raise CheckpointError(f"checkpoint {str(directory)!r} has no {required}")
    return directory


def read_checkpoint(directory: str | Path) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """config.json and tensors of a checkpoint, each validated as a file."""
    directory = _resolve(directory)
    try:
        hf = json.loads((directory / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{directory / CONFIG} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{directory / CONFIG} must hold a JSON object")
    try:
        tensors = safetensors.torch.load_file(directory / WEIGHTS)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{directory / WEIGHTS} is not a valid safetensors file ({err})") from None
    return directory, hf, tensors


def _stored_width(tensors: dict[str, torch.Tensor], where: Path) -> int:
    name = "model.layers.0.mlp.up_proj.weight"
    if name not in tensors:
        raise CheckpointError(f"{where}: tensor {name!r} is missing")
    return tensors[name].shape[0]


def checkpoint_layout(directory: str | Path) -> tuple[Path, ModelConfig, int, dict[str, torch.Tensor]]:
    """(path, base model config, stored tier, tensors), with the metadata cross-checked."""
    path, hf, tensors = read_checkpoint(directory)
    try:
        stored_cfg = ModelConfig.from_hf_dict(hf, source=str(path / CONFIG))
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    width = _stored_width(tensors, path)
    has_tier, has_base = "matformer_tier" in hf, "matformer_base_intermediate_size" in hf
    try:
        if has_tier != has_base:
            raise CheckpointError(f"{path / CONFIG}: matformer_tier and matformer_base_intermediate_size must be "
                                  f"given together (found only {'matformer_tier' if has_tier else 'matformer_base_intermediate_size'})")
        if has_tier:
            base, tier = hf["matformer_base_intermediate_size"], hf["matformer_tier"]
            if tier_width(base, tier) != stored_cfg.intermediate_size:
                raise CheckpointError(f"{path / CONFIG}: metadata contradicts itself: matformer_tier {tier} of base "
                                      f"{base} is width {base >> tier}, but intermediate_size is {stored_cfg.intermediate_size}")
        else:
            # No metadata: a narrower FFN than config.json declares means a sliced export.
            base = stored_cfg.intermediate_size
            tier = width_tier(base, width)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG}: {err}") from None
    if width != base >> tier:
        raise CheckpointError(f"{path}: FFN tensors are {width} wide, config.json says {base >> tier}")
    base_cfg = ModelConfig(**{**stored_cfg.__dict__, "intermediate_size": base})
    return path, base_cfg, tier, tensors


def _model_from_tensors(cfg: ModelConfig, stored_tier: int, tensors: dict[str, torch.Tensor], where: Path,
                        dtype: torch.dtype = torch.float32) -> MatFormerLM:
    with torch.device("meta"):
        expected = MatFormerLM(cfg, stored_widths=[cfg.intermediate_size >> stored_tier] * cfg.num_hidden_layers)
    shapes = {name: tuple(p.shape) for name, p in expected.named_parameters()}
    if cfg.tie_word_embeddings:  # HF drops the tied head on save
        tensors = {n: t for n, t in tensors.items() if n != "lm_head.weight"}
    missing, unexpected = set(shapes) - set(tensors), set(tensors) - set(shapes)
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensors disagree with config.json: missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{where}: tensors disagree with config.json: {name!r} has shape "
                                  f"{list(tensors[name].shape)}, config.json implies {list(shape)}")
    model = MatFormerLM(cfg, stored_widths=[cfg.intermediate_size >> stored_tier] * cfg.num_hidden_layers).to(dtype)
    model.load_state_dict({n: tensors[n].to(dtype) for n in shapes}, strict=False)
    return model


def load_checkpoint(directory: str | Path, tier: int = 0, strategy: str = "auto", helper_fraction: float = 0.0,
                    device=None, expected: ModelConfig | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[MatFormerLM, LoadInfo]:
    """Load a checkpoint to run at `tier` under a load strategy (see module doc), its weights
    held as `dtype`. With `expected`, the checkpoint must be that model (at any tier)."""
    if strategy not in LOAD_STRATEGIES:
        raise ConfigError(f"load strategy {strategy!r} is unknown: valid strategies are {', '.join(LOAD_STRATEGIES)}")
    path, cfg, stored_tier, tensors = checkpoint_layout(directory)
    if expected is not None and cfg != expected:
        field = next(f for f in cfg.__dataclass_fields__ if getattr(cfg, f) != getattr(expected, f))
        raise CheckpointError(f"checkpoint {str(path)!r} is a different model than the config: {field} is "
                              f"{getattr(cfg, field)!r} there and {getattr(expected, field)!r} in the config")
    tier_width(cfg.intermediate_size, tier)  # validates the requested tier against the base width
    sliced = stored_tier > 0
    if strategy == "universal" and sliced and tier > 0:
        raise DoubleSlicingError(
            f"checkpoint {str(path)!r} is already sliced to tier {stored_tier} (FFN {cfg.intermediate_size >> stored_tier} "
            f"of {cfg.intermediate_size}); loading it 'universal' at tier {tier} would slice it again. "
            f"Use --matformer-load-strategy auto or sliced")
    resolved = "sliced" if sliced else "universal" if strategy == "auto" else strategy
    effective = max(tier, stored_tier) if strategy == "universal" else tier
    if effective < stored_tier:
        raise ConfigError(f"tier {tier} needs FFN width {cfg.intermediate_size >> tier}, but checkpoint {str(path)!r} "
                          f"stores only {cfg.intermediate_size >> stored_tier} (tier {stored_tier}): valid tiers are "
                          f"{stored_tier}..{cfg.max_tier}")
    # The peer holds exactly what is stored and runs narrower tiers through views.
    model = _model_from_tensors(cfg, stored_tier, tensors, path, dtype).set_tiers(effective).to(device or default_device())
    helper = helper_fraction > 0 and not sliced
    if helper_fraction <= 0:
        reason = "helper fraction is 0"
    elif sliced:
        reason = "auto-disabled: a sliced checkpoint holds no suffix neurons to help with"
        log.warning("helper mode %s (checkpoint %s, tier %d)", reason, path, stored_tier)
    else:
        reason = "enabled: full weights are held"
    return model, LoadInfo(str(path), strategy, resolved, sliced, stored_tier, tier, effective,
                           cfg.intermediate_size, helper, reason)


def export_tiers(directory: str | Path, tiers, out: str | Path) -> list[Path]:
    """Sliced checkpoints `out/tier{t}` for each tier (Psyche's export_matformer_tiers.py).
    Everything is validated before anything is written."""
    path, cfg, stored_tier, tensors = checkpoint_layout(directory)
    for t in tiers:
        tier_width(cfg.intermediate_size, t)
        if t < stored_tier:
            raise ConfigError(f"cannot export tier {t} from {str(path)!r}: it stores only tier {stored_tier} "
                              f"(valid tiers are {stored_tier}..{cfg.max_tier})")
    source = _model_from_tensors(cfg, stored_tier, tensors, path)
    written = []
    for t in tiers:
        sliced = MatFormerLM(cfg, stored_widths=[cfg.intermediate_size >> t] * cfg.num_hidden_layers)
        written.append(save_checkpoint(load_prefix(sliced, source.state_dict()), Path(out) / f"tier{t}"))
    return written


