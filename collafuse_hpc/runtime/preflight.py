"""Checks every rank makes before any collective and before any file is written:
shards against the config, models that can be built, cuts, and whether
``--resume`` may continue the output folder. A refused run changes nothing on disk."""

from __future__ import annotations

import os

import torch

from collafuse_hpc.config import Config
from collafuse_hpc.config_rules import missing_shards, refuse_missing
from collafuse_hpc.data import ShardReader, inspect_shard
from collafuse_hpc.diffusion.split import cuts
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.evaluation.evaluate import check_config as check_eval
from collafuse_hpc.evaluation.evaluate import check_places
from collafuse_hpc.results.schema import index_path
from collafuse_hpc.results.tensorboard import check_available
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.launch import torch_threads
from collafuse_hpc.runtime.methods import method


def preflight(cfg: Config, resume: bool | str, sample: bool = False) -> int:
    """Checks every rank makes before any collective and before any file is written;
    returns the round to start at.

    Args:
        resume: False (a new run), True (continue the newest complete checkpoint set;
            refused without one) or "auto" (continue one if there is one, else start).
        sample: the ``sample`` command (it continues the newest set too); names it in errors.
    """
    check(cfg)
    index = index_path(cfg.run.output_dir)
    if not resume:
        if os.path.exists(index):
            raise ValueError(
                f"{index!r} holds results of an earlier run; pass --resume to continue it or set "
                "run.output_dir to a new folder"
            )
        return 0
    return _resume_round(cfg, resume == "auto", "sample" if sample else "--resume")


def check(cfg: Config, plan: bool = False) -> list[str]:
    """What a config needs beyond its own rules: shards that fit it, models that build,
    cuts with grids, the files it names. ``config`` and ``--dry-run`` check it too, so
    a config they accept is one that trains.

    With ``plan`` (``config``: a job is planned before its data is prepared) a file the
    config names that does not exist yet is not refused: only the checks that read it
    are skipped, and what to say of each such file is returned."""
    missing = missing_shards(cfg)
    if not plan:
        refuse_missing(missing)
    check_places(cfg, evaluating=cfg.eval.at_end, writes_run=not plan)
    for i, c in enumerate(cfg.clients):
        if f"clients.{i}.shard" in missing:
            continue
        info = inspect_shard(c.shard)
        want = (cfg.data.channels, cfg.data.image_size)
        if (info.channels, info.image_size) != want:
            raise ValueError(
                f"shard {c.shard!r} (clients.{i}) holds {info.channels}x{info.image_size}x"
                f"{info.image_size} images, but 'data' asks for {want[0]}x{want[1]}x{want[1]}"
            )
        if (c.labels or c.share_labels) and not info.has_labels:
            raise ValueError(f"clients.{i} uses labels, but shard {c.shard!r} has no labels")
        if c.labels or c.share_labels:
            labels = ShardReader(c.shard, "train").labels()
            if labels.min() < 0 or labels.max() >= cfg.data.num_classes:
                raise ValueError(
                    f"clients.{i} uses labels, but shard {c.shard!r} has labels {labels.min()}..{labels.max()}, "
                    f"outside [0, data.num_classes = {cfg.data.num_classes}): set data.num_classes to at least "
                    f"{labels.max() + 1}"
                )
        if c.batch_size > info.counts["train"]:
            raise ValueError(
                f"config key 'clients.{i}.batch_size' is {c.batch_size}, but shard {c.shard!r} holds only "
                f"{info.counts['train']} train images"
            )
    cuts(method(cfg).client_config(cfg))  # a cut of 0 without opt-in, a sampling grid that cannot be built
    _check_models(cfg)
    if cfg.run.tensorboard:
        check_available()
    if cfg.eval.at_end:
        try:
            check_eval(cfg)
        except ValueError as e:
            if not (plan and _eval_file_missing(cfg)):
                raise
            missing["eval"] = str(e)
    return list(missing.values())


def _eval_file_missing(cfg: Config) -> bool:
    """Whether the network file the evaluation's extractor reads is named but not there."""
    path = {"inception": cfg.eval.inception_path, "classifier": cfg.eval.classifier_path}.get(cfg.eval.extractor)
    return bool(path) and not os.path.isfile(path)


def _check_models(cfg: Config) -> None:
    """Build every distinct model and run one forward pass of one image, so sizes that
    cannot work fail now, naming their key.

    On the CPU, not on the meta device: meta tensors run torch's Python reference
    kernels, whose first call imports torch._dynamo, 1.7 s of CPU at the start of every
    rank and command; the shipped configs' models build and run here in under 0.5 s, at
    one thread (the ranks of a node have not divided its cores yet)."""
    size, channels = cfg.data.image_size, cfg.data.channels
    shared = any(c.share_labels for c in cfg.clients)
    # (model, classes, cut conditioning) -> the first key that asks for it, and its ModelConfig
    specs = {
        (repr(cfg.server.model), cfg.data.num_classes + 1 if shared else 0, True): ("server.model", cfg.server.model)
    }
    for i, c in enumerate(cfg.clients):
        specs.setdefault(
            (repr(c.model), cfg.data.num_classes if c.labels else 0, False), (f"clients.{i}.model", c.model)
        )
    for (model, classes, cut), (key, m) in specs.items():
        try:  # torch.random.fork_rng: the caller's global stream stays as it was
            with torch_threads(1), torch.no_grad(), torch.random.fork_rng(devices=[]):
                t = torch.zeros(1, dtype=torch.long)
                net = UNet(m, channels, size, num_classes=classes, cut_conditioning=cut).eval()  # shapes only
                net(torch.zeros(1, channels, size, size), t, t if cut else None, t if classes else None)
        except (ValueError, RuntimeError, AssertionError) as e:
            raise ValueError(
                f"config key '{key}' ({model}) does not give a working UNet for {channels}x{size}x{size} images: "
                f"{(str(e).splitlines() or [type(e).__name__])[0]} (channel counts base_channels x channel_mult "
                "should be multiples of 4, or of 32 from 128 on; image_size divisible by 2^(levels - 1))"
            ) from None


def _resume_round(cfg: Config, auto: bool, command: str) -> int:
    """The newest complete set's round, after checking that this config may continue it."""
    out = cfg.run.output_dir
    if not checkpoint.complete_rounds(out):
        if auto:
            return 0
        raise ValueError(
            f"{command}: {checkpoint.describe(out)}, so there is nothing to continue. Start without --resume "
            "(a new run.output_dir), or pass --resume=auto to continue when a set exists and start otherwise"
        )
    round_ = checkpoint.trained_round(cfg, command)
    if cfg.run.rounds < round_:
        raise ValueError(
            f"{command}: the run in {out!r} has finished {round_} rounds, but run.rounds is {cfg.run.rounds}; "
            "rounds are never undone: raise run.rounds to train on, or use 'collafuse-hpc sample' to sample again"
        )
    return round_
