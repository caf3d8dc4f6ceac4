"""Evaluation of a trained run: image quality, disclosure and client compute.

``collafuse-hpc evaluate CONFIG`` (or ``eval.at_end``) loads the newest complete
checkpoint set into one process and, per client and pooled over clients,
compares five image sets with the client's held-out real test images:

- ``collaborative``: the server runs T..h, the client h..0 (what a run samples);
- ``cut``: x_c of the real test images, as sent (what the server sees in training);
- ``server_at_cut``: the server's output x_h at the hand-over step;
- ``server_alone``: the server continuing from x_h to t = 0 with its own model
  (anchor 0, clipped), what a curious server could make of its part alone;
- ``client_alone``: the client's cut model (trained only on t <= t_c) run over the whole
  chain T..0 from pure noise: a diagnostic of what the cut model knows, not a baseline
  anyone would deploy. The baseline for "should a client collaborate?" is the run at
  c = 1, where each client trains the whole chain alone (docs/study.md).

Every set is quantized to uint8 before feature extraction (noised sets clipped
to [-1, 1] first), as reference FID tools score image files: the stored and
exported images give the stored scores. It also reports the disclosure of what
crossed the wire (metrics.py) and the client's compute (compute.py), and writes
everything to ``results.h5`` under ``/metrics`` (layout: results/schema.py).
What x_c discloses, by formula and by attack, is scored in disclosure.py.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import h5py
import numpy as np
import torch
import yaml

from collafuse_hpc.config import Config, to_dict
from collafuse_hpc.config_rules import changed_keys
from collafuse_hpc.data import ShardReader, inspect_shard, to_model_range, to_uint8
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.evaluation import attacks, metrics
from collafuse_hpc.evaluation.classifier import Classifier
from collafuse_hpc.evaluation.compute import client_compute
from collafuse_hpc.evaluation.disclosure import attack, disclosure
from collafuse_hpc.evaluation.features import (
    FEATURES_VERSION,
    cached_real_features,
    features,
    inception_path,
    load_extractor,
)
from collafuse_hpc.logs import Progress
from collafuse_hpc.results.schema import (
    METRIC_UNITS,
    METRICS,
    SETS,
    audit_totals,
    index_path,
    part_path,
    record_key,
)
from collafuse_hpc.results.writer import begin_record, finish_record, point_newest
from collafuse_hpc.roles.client import Client, finish_samples, sample_alone
from collafuse_hpc.roles.host import ClientHost, batches, sampling_key
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.launch import torch_threads
from collafuse_hpc.runtime.topology import Topology
from collafuse_hpc.tables import format_table

log = logging.getLogger("collafuse_hpc")

GRID_IMAGES = 64  # images kept per set for sample grids
FROM_SERVER = {"collaborative", "server_at_cut", "server_alone"}  # sets that start from the server's x_h


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("eval.device is 'cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def _cache_dir(cfg: Config) -> str:
    return cfg.eval.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "collafuse_hpc")


def load_roles(cfg: Config, round_: int, device: torch.device) -> tuple[dict[int, Server], list[Client]]:
    """Servers by rank and clients by index with the weights of the set of ``round_``
    (weights only: random streams are the evaluation's own), each client counting as
    released what its audit holds too (what left it after that set, Client.count_audited)."""
    topo = Topology.from_config(cfg)
    out = cfg.run.output_dir
    servers = {}
    for rank in range(topo.num_servers):
        servers[rank] = Server(cfg, topo.clients_of(rank), device)
        servers[rank].net.load_member_state(0, checkpoint.load_rank(out, round_, rank)["state"]["net"])
    clients = ClientHost(cfg, list(range(len(cfg.clients))), device).clients  # one model per shape: sampled together
    states = checkpoint.load_clients(out, round_, [c.id for c in cfg.clients])
    for client in clients:
        client.load_weights(states[client.id])
        part = part_path(out, client.id)
        if os.path.exists(part):
            with h5py.File(part, "r", locking=False) as f:
                client.count_audited(audit_totals(f))
    return servers, clients


def generate(
    servers: dict[int, Server | None], clients: list[Client], n: int, sets: tuple[str, ...] = SETS
) -> list[dict[str, torch.Tensor]]:
    """One batch of n images of each generated set in ``sets`` for each of ``clients``
    (members of one Trainable with one sampling grid, host.batches), float
    [n, C, H, W]; the clients sample together. ``servers``: each client's server by
    client index (None when it does not use one); the server's sets only then."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in clients]
    requests = {c.index: c.sample_request(0, n) for c in clients}
    for c in clients:
        c.drain_audit()  # evaluation sends nothing anywhere
    asked = {k: m for k, m in requests.items() if m is not None and servers[k] is not None and FROM_SERVER & set(sets)}
    replies: dict[int, torch.Tensor] = {}
    for server in {id(servers[k]): servers[k] for k in asked}.values():  # each server once, for all its clients
        mine = {k: m for k, m in asked.items() if servers[k] is server}
        replies.update({k: reply.payload.float() for k, reply in server.sample(mine).items()})
    x_h: list[torch.Tensor | None] = [replies.get(c.index) for c in clients]
    for i, c in enumerate(clients):
        if x_h[i] is None:
            continue
        out[i]["server_at_cut"] = x_h[i]
        if "server_alone" in sets:
            out[i]["server_alone"] = servers[c.index].continue_alone(c.index, requests[c.index], x_h[i], c.generator)
    if "collaborative" in sets:
        for i, images in enumerate(finish_samples(clients, n, x_h)):
            out[i]["collaborative"] = images
    if "client_alone" in sets:
        for i, images in enumerate(sample_alone(clients, n)):
            out[i]["client_alone"] = images
    return [{name: images for name, images in o.items() if name in sets} for o in out]


def check_config(cfg: Config) -> None:
    """The files evaluate needs, checked before training with ``eval.at_end`` (ValueError)."""
    if cfg.eval.extractor == "inception":
        inception_path(cfg.eval.inception_path)  # a missing file fails now, not after hours of sampling
    if cfg.eval.extractor == "classifier":  # a missing or foreign file, other images: now, not after sampling
        Classifier(cfg.eval.classifier_path, torch.device("cpu")).check(cfg.data.channels, cfg.data.image_size)


def image_steps(cut: Cut, sets: list[str]) -> int:
    """Model evaluations per generated image of one client's ``sets``: the server's grid
    (collaborative, server_at_cut, server_alone), the client's grid (collaborative), the
    server continuing alone, the client alone (its whole grid)."""
    server, client = (max(0, len(grid) - 1) for grid in cut.sampling_grids())
    full = len(cut.full_chain().sampling_grids()[1]) - 1
    steps = server if FROM_SERVER & set(sets) else 0
    steps += client if "collaborative" in sets else 0
    steps += client if "server_alone" in sets and cut.uses_server else 0
    return steps + (full if "client_alone" in sets else 0)


def planned_images(cfg: Config, cuts: list[Cut]) -> int:
    """Images per set and client: ``eval.images``, or fewer to fit ``eval.max_image_steps``.
    Logs the plan (images x steps) either way."""
    per_image = sum(image_steps(cut, cfg.eval.sets) for cut in cuts)
    n, budget = cfg.eval.images, cfg.eval.max_image_steps
    log.info(
        "evaluate: %d clients x %d images, %d model evaluations per image over all clients = %d image-steps",
        len(cuts),
        n,
        per_image,
        n * per_image,
    )
    if budget and n * per_image > budget:
        n = budget // per_image
        if n < 2:
            raise ValueError(
                f"eval.max_image_steps = {budget} allows {n} images per set; at least 2 are needed "
                f"({2 * per_image} image-steps): raise it, or lower diffusion.sampling_steps"
            )
        log.info("evaluate: within eval.max_image_steps = %d: %d images per set and client", budget, n)
    return n


def _image_sets(
    cfg: Config,
    servers: dict[int, Server | None],
    clients: list[Client],
    x_c: dict[int, torch.Tensor],
    total: int,
    check: Callable[[], None],
) -> dict[int, dict[str, torch.Tensor]]:
    """The five sets of each of ``clients`` (one batch of host.batches): ``total`` images
    each, generated together in passes of at most ``eval.batch`` images, ``check``
    called before each; a set a client's cut does not have is left out."""
    parts: dict[int, dict[str, list[torch.Tensor]]] = {c.index: {} for c in clients}
    per = max(1, cfg.eval.batch // len(clients))
    names = ", ".join(c.id for c in clients[:3]) + (f" and {len(clients) - 3} more" if len(clients) > 3 else "")
    progress = Progress(f"evaluating client(s) {names}", total * len(clients))
    for start in range(0, total, per):
        check()
        n = min(per, total - start)
        for c, made in zip(clients, generate(servers, clients, n, tuple(cfg.eval.sets))):
            for name, images in made.items():
                parts[c.index].setdefault(name, []).append(images)
        progress.update(n * len(clients))
    out = {}
    for c in clients:
        sets = {name: torch.cat(images) for name, images in parts[c.index].items()}
        if c.cut.uses_server and "cut" in cfg.eval.sets:
            sets["cut"] = x_c[c.index]
        out[c.index] = {name: sets[name] for name in SETS if name in sets}
    return out


def _sampling_batches(clients: list[Client], images: int, batch: int) -> list[list[Client]]:
    """Clients that generate together (one model, one grid), at most ``batch // images``
    at a time so that the sets of a batch stay about ``batch`` images per pass."""
    size = max(1, batch // max(1, images))
    out = []
    for group in batches(clients, sampling_key):
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def _quality(real: np.ndarray, fake: np.ndarray, cfg: Config) -> dict:
    """FID and KID of ``fake`` against ``real`` features; with a classifier's features also
    precision and recall, and 95% bootstrap intervals over images (``eval.bootstrap``)."""
    k_mean, k_std = metrics.kid(real, fake, cfg.eval.kid_subsets, cfg.eval.kid_subset_size, cfg.run.seed)
    out = {"fid": metrics.fid(real, fake), "kid_mean": k_mean, "kid_std": k_std}
    if cfg.eval.extractor != "classifier":
        return out
    out["precision"], out["recall"] = metrics.precision_recall(real, fake)
    if cfg.eval.bootstrap:
        interval = functools.partial(metrics.bootstrap_interval, resamples=cfg.eval.bootstrap, seed=cfg.run.seed)
        out["fid_low"], out["fid_high"] = interval(metrics.fid, (real, fake))
        for i, name in enumerate(("precision", "recall")):
            out[f"{name}_low"], out[f"{name}_high"] = interval(
                lambda r, f, i=i: metrics.precision_recall(r, f)[i], (real, fake), bounds=(0.0, 1.0)
            )
    return out


def _label_counts(client: Client, classes: int) -> np.ndarray:
    """Images per class in a client's train split, [classes] (ValueError for a shard
    without labels)."""
    labels = client.reader.labels()
    if labels is None:
        raise ValueError(
            f"client {client.id!r}: its shard has no labels, so class fidelity cannot be scored; "
            "use eval.extractor inception or pixels for unlabelled data"
        )
    return np.bincount(labels, minlength=classes)


def _fidelity(scorer: Classifier, images: np.ndarray, own: np.ndarray, cfg: Config) -> dict:
    """For uint8 ``images`` of a client whose train labels count ``own`` per class: class
    fidelity (share in the classes it holds), class distance (total variation to its
    label mix), each with its bootstrap interval over images, and mean confidence."""
    probabilities = scorer.probabilities(images)
    held = set(np.flatnonzero(own).tolist())
    scores = {
        "class_fidelity": lambda p: metrics.class_fidelity(p, held)[0],
        "class_distance": lambda p: metrics.class_distance(p, own),
    }
    out = {name: score(probabilities) for name, score in scores.items()}
    out["confidence"] = metrics.class_fidelity(probabilities, held)[1]
    for name, score in scores.items() if cfg.eval.bootstrap else ():
        low, high = metrics.bootstrap_interval(score, (probabilities,), cfg.eval.bootstrap, cfg.run.seed, (0.0, 1.0))
        out.update({f"{name}_low": low, f"{name}_high": high})
    return out


def evaluate(cfg: Config, check: Callable[[], None] = lambda: None, threads: int | None = None) -> dict:
    """Evaluate the newest complete checkpoint set of ``cfg.run.output_dir``; write
    ``/metrics`` into its results.h5 and return the same numbers as a dict.

    ``check`` runs before every batch of generated images: it raises to stop (a
    preemption signal); then nothing is written. Runs with ``threads`` torch threads
    (default ``run.threads``; 0: the caller's), and gives the caller its own back."""
    with torch_threads(cfg.run.threads if threads is None else threads):
        return _evaluate(cfg, check)


def _evaluate(cfg: Config, check: Callable[[], None]) -> dict:
    check_config(cfg)
    device = _device(cfg.eval.device)
    scorer = Classifier(cfg.eval.classifier_path, device) if cfg.eval.extractor == "classifier" else None
    if scorer is not None:
        extract, identity = scorer.features, scorer.identity
    else:
        extract, identity = load_extractor(cfg.eval.extractor, cfg.eval.inception_path, device)
    round_ = checkpoint.trained_round(cfg, "evaluate")
    index = index_path(cfg.run.output_dir)
    if not os.path.exists(index):
        raise ValueError(f"{index!r} not found: evaluate needs the run's results file")
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    servers, clients = load_roles(cfg, round_, device)
    topo = Topology.from_config(cfg)
    n = planned_images(cfg, [c.cut for c in clients])
    report: dict = {}
    pooled = {s: ([], []) for s in SETS}  # set -> (real features, generated features) of the clients that have it
    grids = {}

    def feats(images: np.ndarray) -> np.ndarray:
        return features(extract, images, cfg.eval.batch, device)

    compute_of: dict[tuple, dict] = {}  # client compute by (model, batch, labels, grid, t_c)
    servers_of = {c.index: servers[topo.server_of(c.index)] if c.cut.uses_server else None for c in clients}
    for group in _sampling_batches(clients, n, cfg.eval.batch):
        real_u8, labels, x0, x_c = {}, {}, {}, {}
        for client in group:
            reader = ShardReader(cfg.clients[client.index].shard, "test")
            if len(reader) < 2:
                raise ValueError(f"shard {cfg.clients[client.index].shard!r} has {len(reader)} test images; need >= 2")
            real_u8[client.index], labels[client.index] = reader.read(np.arange(min(n, len(reader))))
            x0[client.index] = to_model_range(real_u8[client.index], device)
            x_c[client.index] = client.noised_to_cut(x0[client.index]).float()
        generated = _image_sets(cfg, servers_of, group, x_c, n, check)
        for client in group:
            k = client.index

            def cached(split: str, images: np.ndarray, shard: str = cfg.clients[k].shard) -> np.ndarray:
                """Features of the first len(images) real images of ``split``, from the cache."""
                key = f"{inspect_shard(shard).content_hash[:16]}-{split}{len(images)}-{identity}-v{FEATURES_VERSION}"
                return cached_real_features(_cache_dir(cfg), key, lambda: feats(images))

            real = cached("test", real_u8[k])
            entry = {}
            if scorer is not None:  # the known answers: real test images against each other and the classes
                own = _label_counts(client, scorer.meta["num_classes"])
                half = len(real) // 2
                entry["real"] = {"fid_real_halves": metrics.fid(real[:half], real[half:]), "images": len(real)}
                entry["real"].update(_fidelity(scorer, real_u8[k], own, cfg))
            for name, images in generated[k].items():
                scored = to_uint8(images)  # what is stored and exported is what is scored
                fake = feats(scored)
                pooled[name][0].append(real)  # each client weighs the same on both sides of the pooled
                pooled[name][1].append(fake[: len(real)])  # score: min(n, its test split) images each
                entry[name] = {**_quality(real, fake, cfg), "images": len(fake), "real_images": len(real)}
                if scorer is not None:
                    entry[name].update(_fidelity(scorer, scored, own, cfg))
                grids[(client.id, name)] = scored[:GRID_IMAGES]
            entry["disclosure"] = disclosure(client, x0[k], x_c[k])
            y = torch.from_numpy(labels[k]).to(device) if client.condition else None
            entry["attack"] = attack(client, clients, x0[k], x_c[k], y, real, feats, cached, n)
            # the cost of a model on a grid is the same for every client that has both: measured once
            key = (
                repr(cfg.clients[k].model),
                client.batch_size,
                client.condition,
                sampling_key(client),
                client.cut.t_c,
            )
            if key not in compute_of:
                compute_of[key] = client_compute(client, min(n, 16))
            entry["compute"] = dict(compute_of[key])
            report[client.id] = entry
            log.info("evaluated client %s: %s", client.id, _line(entry))
    report["pooled"] = {}
    for name, (reals, fakes) in pooled.items():
        if fakes:
            real, fake = np.concatenate(reals), np.concatenate(fakes)
            report["pooled"][name] = {**_quality(real, fake, cfg), "images": len(fake), "real_images": len(real)}
    _write(index, cfg, report, grids, identity, round_, started)
    log.info("evaluation of round %d written to %s (%.1f s)", round_, index, time.perf_counter() - t0)
    return report


def print_report(report: dict) -> None:
    """FID / KID per client and image set, then disclosure and client compute."""
    rows = [
        [who, *(f"{entry[s]['fid']:.2f} / {entry[s]['kid_mean']:.4f}" if s in entry else None for s in SETS)]
        for who, entry in report.items()
    ]
    print(f"\n{format_table(['FID / KID mean', *SETS], rows)}")
    for who, entry in report.items():
        if "disclosure" in entry:
            d, c = entry["disclosure"], entry["compute"]
            print(
                f"{who}: t_c={d['t_c']} SNR {d['snr']:.3g}, PSNR {d['psnr_db']:.2f} dB, SSIM {d['ssim']:.3f}, "
                f"mu {d['mu_per_release']:.3g} per release x {d['releases']} releases = {d['mu_composed']:.3g} "
                f"({d['reading']}); client sampling time {c['sampling_time_ratio']:.3f} of local-only "
                f"(ideal {c['sampling_ideal_ratio']:.3f})"
            )
            print(f"{who}: attack: {attacks.describe(entry['attack'])}")


def _line(entry: dict) -> str:
    return ", ".join(f"{s} FID {entry[s]['fid']:.2f}" for s in SETS if s in entry)


def _write(index: str, cfg: Config, report: dict, grids: dict, identity: str, round_: int, started: str) -> None:
    """A new evaluate record holding the metrics; /metrics then points at them. The
    metrics of earlier evaluations stay in their records."""
    with h5py.File(index, "r", locking=False) as f:
        trained_with = yaml.safe_load(f.attrs["config"])
    n = begin_record(index, "evaluate", round_, changed_keys(trained_with, to_dict(cfg)))
    with h5py.File(index, "a", locking=False) as f:
        target = record_key(n, METRICS)
        f[record_key(n)].attrs["started"] = started
        g = f.create_group(target)
        g.attrs.update(
            extractor=identity,
            partition=",".join(sorted({inspect_shard(c.shard).partition or "?" for c in cfg.clients})),
            checkpoint_round=round_,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            units=METRIC_UNITS,
            record=n,
        )
        for who, entry in report.items():
            for name, values in entry.items():
                sub = g.create_group(f"{who}/{name}")
                sub.attrs.update(values)
                if (who, name) in grids:
                    sub.create_dataset("images", data=grids[(who, name)])
        point_newest(f, METRICS, target)
    scored = sum(entry[s]["images"] for who, entry in report.items() if who != "pooled" for s in SETS if s in entry)
    finish_record(index, n, {"extractor": identity, "images_scored": scored, "clients": len(report) - 1})
