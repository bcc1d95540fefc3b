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

Where Psyche's client looks: tier t of the checkpoint at `base` is the sibling directory
`<base>-tier<t>` (`resolve_tier_checkpoint`: its three rules), which `export_tiers` writes.

Saves are atomic: the new checkpoint is written beside the old one and swapped
in by renames, so an interrupted save leaves the previous checkpoint loadable.
"""
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from sim.align import prefix_dim
from sim.config import ModelConfig
from sim.errors import CheckpointError, ConfigError, DoubleSlicingError, MissingTierCheckpoint
from sim.model import MatFormerLM, default_device, is_mlp_sliced
from sim.tiers import tier_width, width_tier

log = logging.getLogger(__name__)
WEIGHTS, CONFIG = "model.safetensors", "config.json"
INDEX, SHARD = "model.safetensors.index.json", "model-{:05d}-of-{:05d}.safetensors"   # sharded, as HF writes them
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
    return tier_config(model.cfg, tiers.pop())


def tier_config(cfg: ModelConfig, tier: int) -> dict:
    """config.json of base config `cfg` stored at `tier`: its FFN width, and the metadata that
    says which tier of which base width it is."""
    hf = cfg.to_hf_dict()
    hf.update(intermediate_size=cfg.intermediate_size >> tier, matformer_tier=tier,
              matformer_base_intermediate_size=cfg.intermediate_size)
    return hf


def declared_base(hf: dict, source: str) -> tuple[ModelConfig, int | None]:
    """(the base (tier-0) config a config.json declares, and the tier its MatFormer metadata
    declares), the metadata checked against itself. Without metadata: the stored config as it
    is, and tier None (only the stored tensors' width can tell then)."""
    try:
        stored_cfg = ModelConfig.from_hf_dict(hf, source=source)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    has_tier, has_base = "matformer_tier" in hf, "matformer_base_intermediate_size" in hf
    if has_tier != has_base:
        raise CheckpointError(f"{source}: matformer_tier and matformer_base_intermediate_size must be "
                              f"given together (found only {'matformer_tier' if has_tier else 'matformer_base_intermediate_size'})")
    if not has_tier:
        return stored_cfg, None
    base, tier = hf["matformer_base_intermediate_size"], hf["matformer_tier"]
    try:
        width = tier_width(base, tier)
    except ConfigError as err:
        raise CheckpointError(f"{source}: {err}") from None
    if width != stored_cfg.intermediate_size:
        raise CheckpointError(f"{source}: metadata contradicts itself: matformer_tier {tier} of base "
                              f"{base} is width {base >> tier}, but intermediate_size is {stored_cfg.intermediate_size}")
    return ModelConfig(**{**stored_cfg.__dict__, "intermediate_size": base}), tier


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(model: MatFormerLM, directory: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write `model`'s stored weights and metadata to `directory`, atomically; past
    `max_shard_bytes`, as shards with an index, as HF's save_pretrained writes them."""
    tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters()}
    return save_tensors(tensors, checkpoint_config(model), directory, max_shard_bytes)


def keep_step(checkpoint: str | Path, directory: str | Path, step: int, keep: int) -> Path:
    """Psyche's client checkpoints (--client-checkpoint-dir, --client-keep-steps): a copy of the
    run's `checkpoint` as `directory`/step-<step>, written beside and renamed into place, and
    only the newest `keep` steps kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target, staging = directory / f"step-{step}", directory / f".step-{step}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(checkpoint, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    steps = sorted((p for p in directory.glob("step-*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        shutil.rmtree(old)
    return target


def save_tensors(tensors: dict[str, torch.Tensor], hf: dict, directory: str | Path,
                 max_shard_bytes: int | None = None, files: dict[str, bytes] | None = None) -> Path:
    """A checkpoint directory from its tensors, config.json and other `files` (name -> bytes),
    written beside and swapped in by renames (an interrupted save leaves the previous
    checkpoint loadable)."""
    directory = Path(directory)
    staging, backup = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".bak")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, data in (files or {}).items():
        _fsync_write(staging / name, data)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _fsync_write(staging / WEIGHTS, safetensors.torch.save(shards[0], metadata={"format": "pt"}))
    else:
        files = [SHARD.format(i + 1, len(shards)) for i in range(len(shards))]
        for file, shard in zip(files, shards):
            _fsync_write(staging / file, safetensors.torch.save(shard, metadata={"format": "pt"}))
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {name: file for file, shard in zip(files, shards) for name in sorted(shard)}}
        _fsync_write(staging / INDEX, json.dumps(index, indent=2, sort_keys=True).encode())
    _fsync_write(staging / CONFIG, json.dumps(hf, indent=2, sort_keys=True).encode())
    if directory.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.rename(directory, backup)
    os.rename(staging, directory)
    shutil.rmtree(backup, ignore_errors=True)
    return directory


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Tensors in name order, cut into shards of at most `max_bytes` (a tensor larger than
    that gets a shard of its own, as HF does)."""
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if max_bytes is not None and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def parse_size(text: str) -> int:
    """Bytes from "200000", "200KB", "5GB" (powers of 1000) or "5GiB" (powers of 1024), as
    HF's max_shard_size reads them."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match or int(match[1]) < 1:
        raise ConfigError(f"shard size {text!r} is invalid: expected a positive byte count such as 200000, 200KB, "
                          f"5GB or 5GiB")
    unit = (match[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(match[1]) * scale


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
    if not (directory / CONFIG).is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {CONFIG}")
    if not (directory / WEIGHTS).is_file() and not (directory / INDEX).is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r} has no {WEIGHTS} (nor {INDEX}, for sharded weights)")
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
    if (directory / WEIGHTS).is_file():
        return directory, hf, _load_safetensors(directory / WEIGHTS)
    return directory, hf, _load_shards(directory)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a valid safetensors file ({err})") from None


def _load_shards(directory: Path) -> dict[str, torch.Tensor]:
    """Sharded weights: every tensor the index's weight_map names, from its shard."""
    try:
        weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{directory / INDEX} is not a safetensors index with a weight_map ({err!r})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{directory / INDEX}: weight_map must map tensor names to shard files")
    tensors = {}
    for file in sorted(set(weight_map.values())):
        if not isinstance(file, str) or Path(file).name != file or not (directory / file).is_file():
            raise CheckpointError(f"{directory / INDEX} names shard {file!r}, which is not a file in {directory}")
        shard = _load_safetensors(directory / file)
        for name in (n for n, f in weight_map.items() if f == file):
            if name not in shard:
                raise CheckpointError(f"{directory / INDEX} puts {name!r} in {file}, which does not hold it")
            tensors[name] = shard[name]
    return tensors


def _stored_width(tensors: dict[str, torch.Tensor], where: Path) -> int:
    name = "model.layers.0.mlp.up_proj.weight"
    if name not in tensors:
        raise CheckpointError(f"{where}: tensor {name!r} is missing")
    return tensors[name].shape[0]


def checkpoint_layout(directory: str | Path) -> tuple[Path, ModelConfig, int, dict[str, torch.Tensor]]:
    """(path, base model config, stored tier, tensors), with the metadata cross-checked."""
    path, hf, tensors = read_checkpoint(directory)
    base_cfg, tier = declared_base(hf, str(path / CONFIG))
    base, width = base_cfg.intermediate_size, _stored_width(tensors, path)
    if tier is None:  # no metadata: a narrower FFN than config.json declares means a sliced export
        try:
            tier = width_tier(base, width)
        except ConfigError as err:
            raise CheckpointError(f"{path / CONFIG}: {err}") from None
    if width != base >> tier:
        raise CheckpointError(f"{path}: FFN tensors are {width} wide, config.json says {base >> tier}")
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
    if not isinstance(tier, int) or isinstance(tier, bool) or tier < 0:
        raise ConfigError(f"tier {tier!r} is invalid: expected an integer >= 0")
    found, _ = resolve_tier_checkpoint(directory, tier, strategy)   # <checkpoint>-tier<t> first, as Psyche
    path, cfg, stored_tier, tensors = checkpoint_layout(directory if found is None else found)
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


# Files of a checkpoint an export copies as they are (Psyche's export_matformer_tiers.py's list).
AUXILIARY = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "*.py")


def tier_path(base: Path, tier: int) -> Path:
    """Where Psyche looks for tier `tier` of the checkpoint at `base`: the sibling `<base>-tier<t>`."""
    return base.with_name(f"{base.name}-tier{tier}") if base.name else base


def resolve_tier_checkpoint(base: str | Path, tier: int, strategy: str) -> tuple[Path | None, bool]:
    """(the checkpoint directory to load, whether it is a tier export by its name): Psyche's
    resolve_matformer_local_repo_path (shared/client/src/state/init.rs). Tier 0 and
    `universal` load `base`; `auto` prefers the sibling `<base>-tier<t>` and falls back to
    `base`; `sliced` requires the sibling where `base` exists (MissingTierCheckpoint). None:
    neither exists."""
    base = Path(base)
    if tier == 0 or strategy == "universal":
        return (base if base.exists() else None), False
    sibling = tier_path(base, tier)
    if sibling.exists():
        return sibling, True
    if strategy == "sliced" and base.exists():
        raise MissingTierCheckpoint(f"Required MatFormer tier checkpoint for tier {tier} not found at {sibling} "
                                    f"(the sliced strategy loads <checkpoint>-tier<t>: export it with matsim "
                                    f"export-tiers, or use --matformer-load-strategy auto)")
    return (base if base.exists() else None), False


def export_tiers(directory: str | Path, tiers, out: str | Path | None = None,
                 max_shard_bytes: int | None = None) -> list[Path]:
    """Sliced checkpoints of a full one, where Psyche's client looks for them: `<name>-tier<t>`
    beside it (or in `out`), as Psyche's scripts/export_matformer_tiers.py writes them: every
    tensor in its stored dtype, each FFN tensor's prefix; config.json with every key of the
    source's, the FFN width and the MatFormer metadata updated; the tokenizer and auxiliary
    files copied. An already-sliced source is refused (a second slice), as is tier 0 (the
    source itself). Everything is validated before anything is written."""
    path, cfg, stored_tier, tensors = checkpoint_layout(directory)
    _model_from_tensors(cfg, stored_tier, tensors, path)   # validates the source's tensors
    if stored_tier > 0:
        raise DoubleSlicingError(f"checkpoint {str(path)!r} is already sliced to tier {stored_tier}: exporting "
                                 f"tiers from it would slice it a second time; export from the full checkpoint")
    for t in tiers:
        tier_width(cfg.intermediate_size, t)
        if t < 1:
            raise ConfigError(f"cannot export tier {t}: tier 0 is the full checkpoint itself (valid tiers are "
                              f"1..{cfg.max_tier})")
    hf = json.loads((path / CONFIG).read_text())
    files = {f.name: f.read_bytes() for pattern in AUXILIARY for f in sorted(path.glob(pattern)) if f.is_file()}
    out = Path(out) if out is not None else path.parent
    written = []
    for t in tiers:   # tensor by tensor, in their stored dtypes: a prefix of every FFN tensor
        width = cfg.intermediate_size >> t
        sliced = {name: x.narrow(prefix_dim(name), 0, width).contiguous() if is_mlp_sliced(name) else x
                  for name, x in tensors.items()}
        config = {**hf, "intermediate_size": width, "matformer_tier": t,
                  "matformer_base_intermediate_size": cfg.intermediate_size}
        written.append(save_tensors(sliced, config, out / tier_path(path, t).name, max_shard_bytes, files))
    return written


