"""Run configuration: one typed dataclass per YAML section.

Precedence is command line (``--set key.path=value``) > YAML file > defaults.
Unknown keys and wrong types are errors that name the key and list the valid
ones. :func:`load` validates everything that can be checked without starting
torch.distributed (config_rules.py), so every rank fails the same way before
any collective.

Each field's comment is its documentation: ``collafuse-hpc config --reference``
(config_reference.py) prints them with types, defaults and the rules. A comment
may start with the field's unit in brackets: ``# [s] ...``.

Usage::

    cfg = load("configs/quickstart.yaml", ["clients.0.cut_ratio=0.4"])
    print(dump(cfg))
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from collafuse_hpc import client_templates
from collafuse_hpc.config_rules import RUN_SETTABLE, run_settable, validate


@dataclass
class DataConfig:
    """Image geometry shared by all clients; every shard must match it."""

    image_size: int = 16  # [pixels] side of the square images
    channels: int = 1  # [channels] 1 grayscale, 3 RGB
    num_classes: int = 10  # label range [0, num_classes) for label conditioning


@dataclass
class DiffusionConfig:
    """The DDPM chain all roles share (diffusion/gaussian.py, diffusion/split.py)."""

    timesteps: int = 1000  # [steps] T, the number of forward noising steps
    schedule: str = "linear"  # noise schedule: linear (betas 1e-4..0.02 scaled to T) or cosine
    sampling_steps: int = 0  # [steps] reverse steps when sampling; 0 means T (no striding)
    split: str = "markov"  # markov (the exact sub-chain) or reference (the authors' code)
    sampler: str = "ddpm"  # ddpm (ancestral steps) or ddim (eta 0: deterministic); both keep t_c on the grid
    eta: float = 0.0  # ddim only: 0 deterministic .. 1 the DDPM posterior's variance


@dataclass
class ModelConfig:
    """UNet size (diffusion/unet.py)."""

    base_channels: int = 64  # [channels] width at full resolution
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])  # width multiplier per resolution level
    num_res_blocks: int = 2  # residual blocks per level
    # [pixels] sides of the feature maps that get self-attention
    attention_resolutions: list[int] = field(default_factory=lambda: [16])
    dropout: float = 0.0  # dropout probability in the residual blocks (each member draws from its own stream)


@dataclass
class OptimConfig:
    """AdamW with gradient clipping and an EMA copy of the weights for sampling."""

    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # largest L2 norm of the gradient (per member); 0 disables clipping
    ema_decay: float = 0.999  # EMA of the weights (sampling uses it), with warm-up (1+n)/(10+n)


@dataclass
class ServerConfig:
    """The shared server: runs the chain above each client's cut."""

    count: int = 1  # [ranks] server ranks 0..count-1, replicas kept identical by a gradient all-reduce
    device: str = "auto"  # auto (the GPU of LOCAL_RANK if CUDA is available), cpu or cuda
    aggregate: str = "concat"  # concat: one step on all clients' batches; sequential: one step per client
    compile: bool = False  # torch.compile the UNet (pays off on GPUs; slow to start on CPU)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class ClientConfig:
    """One client: private shard, its cut and its own model."""

    id: str = ""  # unique name, used in logs, results and file names
    shard: str = ""  # HDF5 shard path (collafuse-hpc prepare); relative to the working directory
    cut_ratio: float | None = None  # c: the fraction of the chain done locally (t_c = round(c T))
    cut_step: int | None = None  # [steps] t_c directly; give cut_ratio or cut_step, not both
    batch_size: int = 50  # [images] per client and round
    hflip: bool = False  # augment: mirror each training image left-right with probability 1/2
    device: str = "cpu"  # auto, cpu or cuda (one device for the clients of one rank)
    labels: bool = False  # condition the client model on its own labels (stay local)
    share_labels: bool = False  # opt-in: send labels with x_c; the server model becomes class-conditioned
    allow_centralized: bool = False  # required for c = 0: the server sees raw images
    allow_new_shard: bool = False  # --resume, sample, evaluate: accept a shard with other images than the run used
    wire_dtype: str = "float32"  # x_c and the returned x_h on the wire; bfloat16 and float16 halve the bytes
    compile: bool = False  # torch.compile the client UNet
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class RunConfig:
    """Loop, output and runtime settings."""

    # split (CollaFuse: the chain cut between the clients and the server) or federated (FedAvg over the whole chain:
    # the baseline a user would run instead; see the federated section)
    method: str = "split"
    output_dir: str = "runs/default"  # folder of results.h5, samples and checkpoints, on a file system every rank sees
    rounds: int = 1000  # [rounds] training rounds (split: one batch per client; federated: local_steps batches)
    seed: int = 0  # base seed; each client, server and member derives its own streams
    log_every: int = 50  # [rounds] between log lines and results flushes
    checkpoint_every: int = 0  # [rounds] between checkpoint sets; 0: only at the end
    keep_checkpoints: int = 2  # [sets] complete checkpoint sets kept on disk
    samples_per_client: int = 64  # [images] each client synthesizes at the end
    clients_per_round: int = 0  # [clients] taking part in each round, a seeded draw (0: every client)
    clients_per_rank: int = 1  # [clients] hosted by one client rank, in config order (topology.py)
    sample_batch: int = 256  # [images] largest batch of one sampling forward pass
    threads: int = 0  # [threads] torch threads per rank; 0: the cores available / ranks on the node
    timeout_s: float = 300.0  # [s] bound on every wait for a peer's message
    # [s] bound on waits for work a peer is known to be doing (the first round, checkpoint writes, sampling);
    # a dead peer is still seen at once (its connection closes), a hung one by its watchdog
    work_timeout_s: float = 86400.0
    stop_check_every: int = 1  # [rounds] between the collectives that agree on a preemption signal
    # [s] after a stop signal, time without a round (or checkpoint, sampling) begun before a rank gives up on
    # the agreed stop and exits 75 at once (a peer failed); raise it above the longest round
    stop_grace_s: float = 5.0
    watchdog_s: float = 1800.0  # [s] end a rank that makes no progress this long (hangs below the wire); 0: off
    profile_rounds: int = 0  # [rounds] traced with torch.profiler after 2 warm-up rounds; 0: off
    tensorboard: bool = False  # also write each logged round's scalars to <output_dir>/tensorboard/<role> (extra)


@dataclass
class FederatedConfig:
    """FedAvg (run.method: federated, roles/federated.py): one global model over the whole chain, trained by
    the clients' local steps and averaged on the server; nothing but weights and updates crosses the wire."""

    local_steps: int = 10  # [steps] E: optimizer steps each participant takes per round, one batch each
    # fedavg (theta += server_lr x the images-weighted mean update) or fedadam (Adam on that mean: Reddi et al. 2021)
    server_optimizer: str = "fedavg"
    # eta_s, the server's step on the mean update; empty: 1 for fedavg (plain FedAvg), 0.01 for fedadam (its first
    # step moves every weight by about eta_s: 1 would wreck the model)
    server_lr: float | None = None
    # [steps] F: before sampling, each client fine-tunes the final global model on its own data this long, with a
    # fresh optimizer (personalized FedAvg); 0: each client samples with the global model
    finetune_steps: int = 0
    # the global model's UNet and optimizer: server (server.model and server.optim: equal quality budget) or
    # client (the clients' model and optim, which must be the same for every client: equal client-model budget)
    architecture: str = "server"


@dataclass
class EvalConfig:
    """Evaluation (``collafuse-hpc evaluate``, or at the end of training with ``at_end``)."""

    at_end: bool = False  # evaluate right after training (rank 0, from the final checkpoint set)
    # inception (FID's Inception-v3, a local file), classifier (a domain classifier trained on the real images by
    # collafuse-hpc train-classifier: also class fidelity, precision and recall) or pixels (no weights; a proxy)
    extractor: str = "inception"
    inception_path: str = ""  # weights file; empty: $COLLAFUSE_INCEPTION (features.py lists the accepted forms)
    classifier_path: str = ""  # extractor classifier: the file collafuse-hpc train-classifier wrote
    # [resamples] over images, for the 95% intervals of FID, fidelity, precision, recall, copies, membership and
    # the attacks; 0: none (the linkage rates' Wilson intervals too)
    bootstrap: int = 200
    # measure each client's compute (FLOPs and timings of its share against the full chain); false: leave it out
    # of an evaluation for quality and disclosure only (the timings run the full chain; counting FLOPs loads
    # torch._dynamo, 1.5 s of CPU a process)
    compute: bool = True
    # [repeats] timings of a client's share of sampling and of a round against the full chain, side by side in
    # alternating order (client compute; its FLOPs are counted once)
    timing_repeats: int = 4
    images: int = 1000  # [images] generated per set and client (and at most this many real test images)
    max_image_steps: int = 0  # [image-steps] budget: images x reverse steps of all sampling; 0: none
    sets: list[str] = field(  # which image sets to generate and score
        default_factory=lambda: ["collaborative", "cut", "server_at_cut", "server_alone", "client_alone", "global"]
    )
    kid_subsets: int = 100  # [subsets] random subsets for KID's mean and std
    kid_subset_size: int = 1000  # [images] per KID subset (capped at the set sizes)
    batch: int = 250  # [images] per sampling and feature batch
    device: str = "auto"  # auto (cuda if available), cpu or cuda
    cache_dir: str = ""  # real-image features per shard hash; empty: $COLLAFUSE_CACHE or ~/.cache/collafuse_hpc


@dataclass
class FaultConfig:
    """Fault injection, to test that failures end every rank promptly and that slow writes are waited for."""

    rank: int = -1  # rank that fails; -1 disables
    round: int = 0  # round at which it fails (raise, exit)
    mode: str = "raise"  # raise (an exception), exit (dies without a word) or slow_write (see delay_s)
    delay_s: float = 0.0  # [s] slow_write: added to each checkpoint file and part-file opening (a slow file system)
    attempt: int = -1  # only in the torchrun attempt after this many restarts of the job; -1: in every attempt


@dataclass
class Config:
    """A whole run: one field per YAML section."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    clients: list[ClientConfig] = field(default_factory=list)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)


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
    unknown = sorted(set(data) - set(hints), key=str)
    if unknown:
        where = f"section '{prefix}'" if prefix else "the top level"
        near = {k: difflib.get_close_matches(str(k), hints, n=1) for k in unknown}  # YAML's `on:` is True
        near = {k: m[0] for k, m in near.items() if m}
        meant = ", ".join(repr(m) if len(unknown) == 1 else f"{m!r} for {k!r}" for k, m in near.items())
        meant = f" (did you mean {meant}?)" if meant else ""
        raise ValueError(f"unknown config key(s) {unknown} in {where}{meant}; valid keys: {sorted(hints)}")
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


def load_run(results: str, overrides: list[str], command: str) -> Config:
    """The config a trained run holds (results.h5's, which a resume updates), for ``command``
    acting on that run: ``overrides`` may change only RUN_SETTABLE keys, and the run is read
    and written where its results file now is. ValueError for any other key."""
    from collafuse_hpc.results.schema import open_results

    for assignment in overrides:
        key = assignment.split("=", 1)[0].strip()
        if "=" in assignment and not run_settable(key):
            raise ValueError(
                f"{command} of a trained run takes its own config: --set {key} may not change it (only "
                f"{', '.join(RUN_SETTABLE)} may); a config that trains something else is a new run: train it "
                "into a new run.output_dir"
            )
    if not os.path.isfile(results):
        raise ValueError(f"{os.path.dirname(results)!r} holds no results.h5: give a run's folder or a config file")
    with open_results(results) as f:
        raw = yaml.safe_load(f.attrs["config"])
    raw["run"]["output_dir"] = os.path.dirname(results) or "."
    raw.pop("fault", None)  # a test hook of the training, not part of what the run is
    return _resolve(raw, overrides)


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
    return _resolve(raw, overrides, check_files)


def _resolve(raw: dict, overrides: list[str], check_files: bool = True) -> Config:
    """The validated config of a raw YAML tree after ``key=value`` overrides."""
    raw = _unshared(raw)
    for assignment in overrides:
        apply_override(raw, assignment)
    cfg = from_dict(raw)
    validate(cfg, check_files=check_files)
    return cfg


def _unshared(node: Any) -> Any:
    """``node`` with every mapping and list its own: YAML anchors and aliases
    (``model: *small``) load as one shared object, which an override of one client's
    key would change for every client that shares it."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML (stored in checkpoints and results)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def with_defaults(raw: dict) -> dict:
    """A stored config (a checkpoint's, results.h5's) with every key this version has: a
    run made before a key existed ran with its default (``run.method: split``), so
    comparing it with today's config must not count that key as changed."""
    return to_dict(from_dict(raw))


def from_dict(raw: dict) -> Config:
    """The config of a raw YAML tree, client templates expanded (not validated)."""
    return _build(Config, client_templates.expand(raw))
