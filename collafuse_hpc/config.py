"""Run configuration: one typed dataclass per YAML section.

Precedence is command line (``--set key.path=value``) > YAML file > defaults.
Unknown keys and wrong types are errors that name the key and list the valid
ones. :func:`load` validates everything that can be checked without starting
torch.distributed, so every rank fails the same way before any collective.

Usage::

    cfg = load("configs/quickstart.yaml", ["clients.0.cut_ratio=0.4"])
    print(dump(cfg))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from collafuse_hpc import client_templates


@dataclass
class DataConfig:
    """Image geometry shared by all clients; every shard must match it."""

    image_size: int = 16  # pixels, square images
    channels: int = 1  # 1 grayscale, 3 RGB
    num_classes: int = 10  # label range [0, num_classes) for label conditioning


@dataclass
class DiffusionConfig:
    """The DDPM chain all roles share (see diffusion.py)."""

    timesteps: int = 1000  # T, number of forward noising steps
    schedule: str = "linear"  # linear (1e-4..0.02) | cosine
    sampling_steps: int = 0  # reverse steps when sampling; 0 means T (no striding)
    split: str = "markov"  # markov (exact sub-chain) | reference (authors' code)
    sampler: str = "ddpm"  # ddpm (ancestral steps) | ddim (eta 0: deterministic); both keep t_c on the grid
    eta: float = 0.0  # ddim only: 0 deterministic .. 1 the DDPM posterior's variance


@dataclass
class ModelConfig:
    """UNet size (unet.py)."""

    base_channels: int = 64  # channels at full resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # per level
    num_res_blocks: int = 2  # residual blocks per level
    attention_resolutions: list[int] = field(default_factory=lambda: [16])  # pixels
    dropout: float = 0.0


@dataclass
class OptimConfig:
    """AdamW with gradient clipping and an EMA copy of the weights for sampling."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    ema_decay: float = 0.999  # EMA of weights, with warm-up (1+n)/(10+n)


@dataclass
class ServerConfig:
    """The shared server: runs the chain above each client's cut."""

    count: int = 1  # server ranks (ranks 0..count-1), replicas kept identical by gradient all-reduce
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    aggregate: str = "concat"  # concat: one step on all clients' batches | sequential
    compile: bool = False  # torch.compile the UNet (pays off on GPUs; slow to start on CPU)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class ClientConfig:
    """One client: private shard, its cut and its own model."""

    id: str = ""  # unique name, used in logs and results
    shard: str = ""  # HDF5 shard path (data.py); relative to the working directory
    cut_ratio: float | None = None  # c in [0, 1]: fraction of steps done locally
    cut_step: int | None = None  # t_c directly; give cut_ratio or cut_step, not both
    batch_size: int = 50  # images per round
    hflip: bool = False  # augment: mirror each training image left-right with probability 1/2
    device: str = "cpu"  # auto | cpu | cuda
    labels: bool = False  # condition the client model on its own labels (stay local)
    share_labels: bool = False  # opt-in: send labels with x_c; the server model becomes class-conditioned
    allow_centralized: bool = False  # required for c = 0: the server sees raw images
    allow_new_shard: bool = False  # --resume: accept a shard holding other images than the run trained on
    wire_dtype: str = "float32"  # x_c and the returned x_h on the wire: float32 | bfloat16 | float16 (half the bytes)
    compile: bool = False  # torch.compile the UNet
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class RunConfig:
    """Loop, output and runtime settings."""

    output_dir: str = "runs/default"  # results.h5, samples, checkpoints
    rounds: int = 1000  # training rounds (one batch per client per round)
    seed: int = 0  # base seed; each role derives its own stream
    log_every: int = 50  # rounds between log lines and results flushes
    checkpoint_every: int = 0  # rounds between checkpoints; 0 only at the end
    keep_checkpoints: int = 2  # checkpoint sets kept on disk
    samples_per_client: int = 64  # images each client synthesizes at the end
    clients_per_round: int = 0  # clients taking part in each round, a seeded draw (0: every client)
    clients_per_rank: int = 1  # clients hosted by one client rank, in config order (topology.py); may change on resume
    sample_batch: int = 256  # max images per server sampling batch
    threads: int = 0  # torch threads per rank; 0 = cores available / ranks on node
    timeout_s: float = 300.0  # bound on every wait for a peer's message, seconds
    # bound on waits for work a peer is known to be doing (the first round, checkpoint writes, sampling),
    # seconds; a dead peer is still seen at once (its connection closes), a hung one by its watchdog
    work_timeout_s: float = 86400.0
    stop_check_every: int = 1  # rounds between the collective that agrees on a preemption signal
    # after a stop signal, seconds without a round (or checkpoint, sampling) begun before a rank gives up on the
    # agreed stop and exits 75 at once (a peer failed); raise it above the longest round
    stop_grace_s: float = 5.0
    watchdog_s: float = 1800.0  # end a rank that makes no progress this long (hangs below the wire); 0 = off
    profile_rounds: int = 0  # trace this many rounds (after 2 warm-up rounds) with torch.profiler; 0 = off
    tensorboard: bool = False  # also write each logged round's scalars to <output_dir>/tensorboard/<role> (extra)


@dataclass
class EvalConfig:
    """Evaluation (``collafuse-hpc evaluate``, or at the end of training with ``at_end``)."""

    at_end: bool = False  # evaluate right after training (rank 0, from the final checkpoint set)
    extractor: str = "inception"  # inception (FID's Inception-v3, local file) | pixels (no weights; a proxy)
    inception_path: str = ""  # weights file; empty: $COLLAFUSE_INCEPTION (features.py lists the accepted forms)
    images: int = 1000  # generated images per set and client (and at most this many real test images)
    max_image_steps: int = 0  # budget: model evaluations (images x reverse steps) of all sampling; 0 = none
    sets: list[str] = field(  # which image sets to generate and score (results/schema.py SETS)
        default_factory=lambda: ["collaborative", "cut", "server_at_cut", "server_alone", "client_alone"]
    )
    kid_subsets: int = 100  # random subsets for KID's mean and std
    kid_subset_size: int = 1000  # images per KID subset (capped at the set sizes)
    batch: int = 250  # images per sampling and feature batch
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    cache_dir: str = ""  # real-image features per shard hash; empty: $COLLAFUSE_CACHE or ~/.cache/collafuse_hpc


@dataclass
class FaultConfig:
    """Fault injection, to test that failures end every rank promptly."""

    rank: int = -1  # rank that fails; -1 disables
    round: int = 0  # round at which it fails
    mode: str = "raise"  # raise (exception) | exit (dies without a word)
    attempt: int = -1  # only in this torchrun attempt (TORCHELASTIC_RESTART_COUNT); -1: in every attempt


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: list[ClientConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


CLIENT_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")

CHOICES = {
    "diffusion.schedule": ("linear", "cosine"),
    "diffusion.split": ("markov", "reference"),
    "diffusion.sampler": ("ddpm", "ddim"),
    "server.device": ("auto", "cpu", "cuda"),
    "server.aggregate": ("concat", "sequential"),
    "clients.device": ("auto", "cpu", "cuda"),
    "clients.wire_dtype": ("float32", "bfloat16", "float16"),
    "fault.mode": ("raise", "exit"),
    "eval.extractor": ("inception", "pixels"),
    "eval.device": ("auto", "cpu", "cuda"),
}


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` and build nested dataclasses."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(hint, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_convert(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise TypeError(f"config key '{key}' must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        raise ValueError(f"unknown config key(s) {unknown} in {where}; valid keys: {sorted(hints)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(raw: dict, assignment: str) -> None:
    """Apply ``a.b.0.c=value`` to the raw YAML tree; the value is parsed as YAML.

    ``*`` as a list index applies to every item (``clients.*.cut_ratio=0.4``).
    """
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key.path=value")
    path, text = assignment.split("=", 1)
    _assign(raw, path.strip().split("."), yaml.safe_load(text), path.strip())


def _assign(node: Any, keys: list[str], value: Any, path: str) -> None:
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if key == "*":
            if rest:
                for item in node:
                    _assign(item, rest, value, path)
            else:
                node[:] = [value] * len(node)
            return
        if not key.isdigit() or int(key) >= len(node):
            raise ValueError(f"override '{path}': no list item {key} (the list has {len(node)})")
        if rest:
            _assign(node[int(key)], rest, value, path)
        else:
            node[int(key)] = value
    elif isinstance(node, dict):
        if rest:
            _assign(node.setdefault(key, {}), rest, value, path)
        else:
            node[key] = value
    else:
        raise ValueError(f"override '{path}': '{key}' is inside a value, not a section")


def validate(cfg: Config, check_files: bool = True) -> None:
    """Raise ValueError naming the key for anything inconsistent."""
    for key, valid in CHOICES.items():
        section, name = key.split(".")
        objs = cfg.clients if section == "clients" else [getattr(cfg, section)]
        for obj in objs:
            if getattr(obj, name) not in valid:
                raise ValueError(f"config key '{key}' is {getattr(obj, name)!r}; valid: {list(valid)}")
    T = cfg.diffusion.timesteps
    if T < 1:
        raise ValueError(f"config key 'diffusion.timesteps' must be >= 1, got {T}")
    if not 0 <= cfg.diffusion.eta <= 1:
        raise ValueError(f"config key 'diffusion.eta' must be in [0, 1], got {cfg.diffusion.eta}")
    if not 0 <= cfg.diffusion.sampling_steps <= T:
        raise ValueError(
            f"config key 'diffusion.sampling_steps' must be in [0, {T}] (0 means T), got {cfg.diffusion.sampling_steps}"
        )
    if not 1 <= cfg.server.count <= max(1, len(cfg.clients)):
        raise ValueError(
            f"config key 'server.count' is {cfg.server.count}; it must be in [1, number of clients "
            f"= {len(cfg.clients)}] (each server rank serves its own clients)"
        )
    if cfg.server.count > 1 and cfg.server.aggregate != "concat":
        raise ValueError(
            "config key 'server.aggregate' is 'sequential', which needs server.count: 1 "
            "(several server replicas step together on their concatenated batches)"
        )
    models = [("server.model", cfg.server.model)] + [(f"clients.{i}.model", c.model) for i, c in enumerate(cfg.clients)]
    for key, m in models:
        if m.base_channels < 1 or m.num_res_blocks < 1:
            raise ValueError(f"config key '{key}': base_channels and num_res_blocks must be >= 1")
        if not m.channel_mult or min(m.channel_mult) < 1:
            raise ValueError(f"config key '{key}.channel_mult' is {m.channel_mult}; give one multiplier >= 1 per level")
        if not 0 <= m.dropout < 1:
            raise ValueError(f"config key '{key}.dropout' must be in [0, 1), got {m.dropout}")
    for name in ("rounds", "log_every", "samples_per_client", "sample_batch", "keep_checkpoints", "stop_check_every"):
        if getattr(cfg.run, name) < 1:
            raise ValueError(f"config key 'run.{name}' must be >= 1, got {getattr(cfg.run, name)}")
    for name in ("images", "kid_subsets", "kid_subset_size", "batch"):
        if getattr(cfg.eval, name) < 2:
            raise ValueError(f"config key 'eval.{name}' must be >= 2, got {getattr(cfg.eval, name)}")
    if not 0 <= cfg.run.clients_per_round <= len(cfg.clients):
        raise ValueError(
            f"config key 'run.clients_per_round' must be in [0, number of clients = {len(cfg.clients)}] "
            f"(0: every client), got {cfg.run.clients_per_round}"
        )
    if cfg.run.clients_per_rank < 1:
        raise ValueError(
            f"config key 'run.clients_per_rank' must be >= 1 (clients hosted by one client rank), "
            f"got {cfg.run.clients_per_rank}"
        )
    per = cfg.run.clients_per_rank
    for first in range(0, len(cfg.clients), per):
        hosted = cfg.clients[first : first + per]
        for key in ("device", "wire_dtype"):  # one rank's clients run on one device and share messages
            values = sorted({getattr(c, key) for c in hosted})
            if len(values) > 1:
                raise ValueError(
                    f"clients {hosted[0].id!r}..{hosted[-1].id!r} share a rank (run.clients_per_rank = {per}) but "
                    f"ask for different {key} values {values}: give them one '{key}', or host fewer clients per rank"
                )
    if cfg.run.profile_rounds < 0:
        raise ValueError(f"config key 'run.profile_rounds' must be >= 0, got {cfg.run.profile_rounds}")
    for name in ("timeout_s", "work_timeout_s", "stop_grace_s"):
        if getattr(cfg.run, name) <= 0:
            raise ValueError(f"config key 'run.{name}' must be > 0 seconds, got {getattr(cfg.run, name)}")
    if not cfg.clients:
        raise ValueError("config key 'clients' is empty; list at least one client")
    ids = [c.id for c in cfg.clients]
    for i, c in enumerate(cfg.clients):
        key = f"clients.{i}"
        if not c.id:
            raise ValueError(f"config key '{key}.id' is missing; give each client a unique name")
        if not CLIENT_ID.fullmatch(c.id):
            raise ValueError(
                f"config key '{key}.id' is {c.id!r}; ids name files and HDF5 groups, so use letters, digits, "
                "'_', '-' and '.', not starting with '.' (e.g. 'c0', 'hospital_a')"
            )
        if ids.count(c.id) > 1:
            raise ValueError(f"config key '{key}.id': client id {c.id!r} is used twice")
        if (c.cut_ratio is None) == (c.cut_step is None):
            raise ValueError(f"client {c.id!r} ('{key}'): give exactly one of cut_ratio or cut_step")
        if c.cut_ratio is not None and not 0.0 <= c.cut_ratio <= 1.0:
            raise ValueError(f"config key '{key}.cut_ratio' must be in [0, 1], got {c.cut_ratio}")
        if c.cut_step is not None and not 0 <= c.cut_step <= T:
            raise ValueError(f"config key '{key}.cut_step' must be in [0, {T}], got {c.cut_step}")
        if (c.labels or c.share_labels) and cfg.data.num_classes < 1:
            raise ValueError(f"client {c.id!r} ('{key}') uses labels, but 'data.num_classes' is 0")
        if c.batch_size < 1:
            raise ValueError(f"config key '{key}.batch_size' must be >= 1, got {c.batch_size}")
        if check_files and not os.path.isfile(c.shard):
            raise ValueError(
                f"config key '{key}.shard': file {c.shard!r} not found (relative paths are "
                f"taken from the working directory {os.getcwd()!r}); prepare it with tools/"
            )


# Keys a resumed run may change: how long, how often, where and how fast it runs, and
# how it is evaluated, but not what it trains (any other difference refuses --resume).
# Shards may move (data staged elsewhere) but must hold the same images.
RESUMABLE = (
    "run.output_dir",
    "run.clients_per_rank",
    "run.rounds",
    "run.log_every",
    "run.checkpoint_every",
    "run.keep_checkpoints",
    "run.samples_per_client",
    "run.sample_batch",
    "run.threads",
    "run.timeout_s",
    "run.work_timeout_s",
    "run.stop_check_every",
    "run.stop_grace_s",
    "run.watchdog_s",
    "run.profile_rounds",
    "run.tensorboard",
    "diffusion.sampling_steps",
    "diffusion.sampler",
    "diffusion.eta",
    "server.device",
    "server.compile",
    "clients.*.device",
    "clients.*.compile",
    "clients.*.shard",
    "clients.*.allow_centralized",
    "clients.*.allow_new_shard",
    "eval.*",
    "fault.*",
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.0.c": value}; lists of mappings are indexed, other lists are values."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
        items = ((str(i), v) for i, v in enumerate(node))
    else:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def resume_differences(saved: dict, current: dict) -> list[str]:
    """``'key: old -> new'`` for each key outside :data:`RESUMABLE` that differs between
    the config a run was started with (``saved``) and ``current`` (both as dicts)."""
    old, new = _flatten(saved), _flatten(current)
    if len(saved.get("clients", [])) != len(current.get("clients", [])):
        return [f"clients: {len(saved.get('clients', []))} -> {len(current.get('clients', []))} clients"]
    missing = object()
    return [
        f"{key}: {old.get(key, '(none)')!r} -> {new.get(key, '(none)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing) and not any(fnmatch.fnmatch(key, p) for p in RESUMABLE)
    ]


def changed_keys(before: dict, after: dict) -> dict[str, Any]:
    """``{key: new value}`` for every dotted key whose value differs between two configs
    (as dicts): what an invocation changed relative to the run it writes into."""
    old, new = _flatten(before), _flatten(after)
    return {key: new.get(key) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def load(path: str | None, overrides: list[str] = (), check_files: bool = True) -> Config:
    """Read YAML, apply ``key=value`` overrides, build and validate the config."""
    raw: dict = {}
    if path is not None:
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise ValueError(f"config file {path!r} not found") from None
        except OSError as e:  # a folder, no permission, ...
            raise ValueError(f"config file {path!r} cannot be read: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"config file {path!r} is not text (YAML expected)") from None
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path!r} must hold a mapping at the top level")
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(raw)
    validate(cfg, check_files=check_files)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML (stored in checkpoints and results)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(raw: dict) -> Config:
    """The config of a raw YAML tree, client templates expanded (not validated)."""
    return _build(Config, client_templates.expand(raw))
