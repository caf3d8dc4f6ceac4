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
crossed the wire (metrics.py), what the parties could learn beyond one x_c (privacy.py:
membership inference against the models others hold, memorized outputs; the attacks at
the run's count of releases per image) and the client's compute (compute.py), and writes
everything to ``results.h5`` under ``/metrics`` (layout: results/schema.py).
What x_c discloses, by formula and by attack, is scored in disclosure.py; the sets
are made in sets.py and scored in quality.py. It logs what each part took (PARTS).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import yaml

from collafuse_hpc.atomic import check_destination
from collafuse_hpc.config import Config, to_dict, with_defaults
from collafuse_hpc.config_rules import changed_keys
from collafuse_hpc.data import ShardReader, inspect_shard, to_model_range, to_uint8
from collafuse_hpc.evaluation import attacks, disclosure, metrics, privacy
from collafuse_hpc.evaluation.classifier import Classifier
from collafuse_hpc.evaluation.compute import client_compute
from collafuse_hpc.evaluation.features import (
    FEATURES_VERSION,
    cached_real_features,
    feature_cache_path,
    features,
    inception_path,
    load_extractor,
)
from collafuse_hpc.evaluation.quality import POOLED_FID, fidelity, label_counts, quality
from collafuse_hpc.evaluation.sets import check_sets, image_sets, load_roles, planned_images, sampling_batches
from collafuse_hpc.logs import Heartbeat
from collafuse_hpc.results.schema import METRIC_UNITS, SETS, index_path, open_results
from collafuse_hpc.results.writer import begin_record, check_space, finish_record, record_metrics
from collafuse_hpc.roles.host import sampling_key
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.launch import torch_threads
from collafuse_hpc.runtime.topology import Topology
from collafuse_hpc.tables import format_table

log = logging.getLogger("collafuse_hpc")

GRID_IMAGES = 64  # images kept per set for sample grids
# the parts of an evaluation whose time it logs, in order; the last three are what the parties could learn
PARTS = (
    "sampling",
    "image quality",
    "attacks on one release",
    "client compute",
    "membership inference",
    "memorization",
    "repeated releases",
)


class Parts:
    """Seconds each of PARTS that ran took, summed over the clients; ``with parts(part,
    stage):`` calls ``check`` (a stop request raises), times the part and names ``stage``
    to the heartbeat. A part that never ran (the client compute with ``eval.compute``
    false) is absent, not recorded as 0 s."""

    def __init__(self, beat: Heartbeat, check: Callable[[], None] = lambda: None):
        self.beat, self.check, self._seconds = beat, check, {}

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds by part, in the order of PARTS."""
        return {part: self._seconds[part] for part in PARTS if part in self._seconds}

    @contextlib.contextmanager
    def __call__(self, part: str, stage: str) -> Iterator[None]:
        if part not in PARTS:
            raise KeyError(f"{part!r} is not one of evaluate's PARTS")
        self.check()
        self.beat.at(stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[part] = self._seconds.get(part, 0.0) + time.perf_counter() - start

    def line(self) -> str:
        """``sampling 8.1 s, image quality 1.2 s, ...``: the parts' seconds in one line."""
        return ", ".join(f"{part} {s:.1f} s" for part, s in self.seconds.items())


def _device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("eval.device is 'cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cpu")


def _cache_dir(cfg: Config) -> str:
    return cfg.eval.cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "collafuse_hpc")


def check_config(cfg: Config) -> None:
    """The files and image sets evaluate needs, checked before training with ``eval.at_end``
    (ValueError)."""
    check_sets(cfg)
    if cfg.eval.extractor == "inception":
        inception_path(cfg.eval.inception_path)  # a missing file fails now, not after hours of sampling
    if cfg.eval.extractor == "classifier":  # a missing or foreign file, other images: now, not after sampling
        Classifier(cfg.eval.classifier_path, torch.device("cpu")).check(cfg.data.channels, cfg.data.image_size)


def check_places(cfg: Config, evaluating: bool, writes_run: bool) -> None:
    """ValueError naming the key when run.output_dir, or (``evaluating``) eval.cache_dir,
    has a file or a broken link in its path, and (``writes_run``: train, sample) when the
    run's folder cannot be written: found before the training or the sampling, not
    after. The cache is not tested for writing: a read-only one that holds every
    feature serves. evaluate writes into results.h5 alone, which it checks itself."""
    places = [("run.output_dir", cfg.run.output_dir, "access" if writes_run else "none")]
    if evaluating:
        default = "" if cfg.eval.cache_dir else " (empty: its default; set it or $COLLAFUSE_CACHE to move it)"
        places.append(("eval.cache_dir" + default, _cache_dir(cfg), "none"))
    for key, folder, test in places:
        try:
            check_destination(folder, folder=True, test=test)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None


def evaluate(cfg: Config, check: Callable[[], None] = lambda: None, threads: int | None = None) -> dict:
    """Evaluate the newest complete checkpoint set of ``cfg.run.output_dir``; write
    ``/metrics`` into its results.h5 and return the same numbers as a dict.

    ``check`` runs before every batch of generated images and every part of the
    evaluation (PARTS): it raises to stop (a preemption signal); then nothing is
    written. Runs with ``threads`` torch threads (default ``run.threads``; 0: the
    caller's), and gives the caller its own back.
    Logs a line at least every 10 s: progress while sampling, else the step under way."""
    with torch_threads(cfg.run.threads if threads is None else threads), Heartbeat("evaluate") as beat:
        return _evaluate(cfg, check, beat)


def _evaluate(cfg: Config, check: Callable[[], None], beat: Heartbeat) -> dict:
    check_config(cfg)
    check_places(cfg, evaluating=True, writes_run=False)
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
    if not os.access(index, os.W_OK):  # found now, not after the sampling
        raise ValueError(
            f"{index!r} cannot be written (no permission, or a read-only file system), and evaluate writes its "
            "metrics there: copy the run folder to a place you can write"
        )
    with open_results(index) as f:  # read whole: a damaged one is refused now, not after the sampling
        settings = changed_keys(with_defaults(yaml.safe_load(f.attrs["config"])), to_dict(cfg))
    check_space(index)  # and a full disk
    t0, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    servers, clients = load_roles(cfg, round_, device)
    topo = Topology.from_config(cfg)
    n = planned_images(cfg, [c.cut for c in clients])
    report: dict = {}
    pooled = {s: ([], []) for s in SETS}  # set -> (real features, generated features) of the clients that have it
    scores: dict[str, tuple[list, list]] = {}  # model -> (members' scores, non-members') of every client
    grids = {}
    parts = Parts(beat, check)
    resamples, seed = cfg.eval.bootstrap, cfg.run.seed

    def feats(images: np.ndarray) -> np.ndarray:
        return features(extract, images, cfg.eval.batch, device)

    compute_of: dict[tuple, dict] = {}  # client compute by (model, batch, labels, grid, t_c)
    servers_of = {c.index: servers[topo.server_of(c.index)] if c.cut.uses_server else None for c in clients}
    for group in sampling_batches(clients, n, cfg.eval.batch):
        real_u8, labels, x0, x_c = {}, {}, {}, {}
        for client in group:
            reader = ShardReader(cfg.clients[client.index].shard, "test")
            if len(reader) < 2:
                raise ValueError(f"shard {cfg.clients[client.index].shard!r} has {len(reader)} test images; need >= 2")
            real_u8[client.index], labels[client.index] = reader.read(np.arange(min(n, len(reader))))
            x0[client.index] = to_model_range(real_u8[client.index], device)
            x_c[client.index] = client.noised_to_cut(x0[client.index]).float()
        with parts("sampling", f"sampling the image sets of client(s) {', '.join(c.id for c in group)}"):
            generated = image_sets(cfg, servers_of, group, x_c, n, check)
        for client in group:
            k = client.index
            stream = privacy.stream(seed, k, device)

            def cached(split: str, images: np.ndarray, shard: str = cfg.clients[k].shard) -> np.ndarray:
                """Features of the first len(images) real images of ``split``, from the cache: the
                first rows of the whole split's when those are cached (memorization embeds every
                training image before the attacks take the first n as candidates)."""
                info, cache = inspect_shard(shard), _cache_dir(cfg)
                key, whole = (
                    f"{info.content_hash[:16]}-{split}{m}-{identity}-v{FEATURES_VERSION}"
                    for m in (len(images), info.counts[split])
                )
                if os.path.exists(feature_cache_path(cache, whole)):
                    return np.load(feature_cache_path(cache, whole))[: len(images)]
                return cached_real_features(cache, key, lambda: feats(images))

            entry, made = {}, {}
            with parts("image quality", f"scoring the image sets of client {client.id}"):
                real = cached("test", real_u8[k])
                if scorer is not None:  # the known answers: real test images against each other and the classes
                    own = label_counts(client, scorer.meta["num_classes"])
                    half = len(real) // 2
                    entry["real"] = {"fid_real_halves": metrics.fid(real[:half], real[half:]), "images": len(real)}
                    entry["real"].update(fidelity(scorer, real_u8[k], own, cfg))
                for name, images in generated[k].items():
                    scored = to_uint8(images)  # what is stored and exported is what is scored
                    fake = feats(scored)
                    pooled[name][0].append(real)  # each client weighs the same on both sides of the pooled
                    pooled[name][1].append(fake[: len(real)])  # score: min(n, its test split) images each
                    entry[name] = {**quality(real, fake, cfg), "images": len(fake), "real_images": len(real)}
                    if scorer is not None:
                        entry[name].update(fidelity(scorer, scored, own, cfg))
                    grids[(client.id, name)] = scored[:GRID_IMAGES]
                    if name in privacy.IMAGE_SETS:
                        made[name] = (scored, fake)
            with parts("memorization", f"looking for client {client.id}'s training images among its samples"):
                copies = {}
                if made:  # without a generated set asked for (eval.sets) no training image is embedded
                    copies = privacy.memorization(made, (real_u8[k], real), client.reader, cached, resamples, seed)
                for name, figures in copies.items():
                    entry[name].update(figures)
            y = torch.from_numpy(labels[k]).to(device) if client.condition else None
            with parts("attacks on one release", f"attacking client {client.id}'s x_c"):
                entry["disclosure"] = disclosure.disclosure(client, x0[k], x_c[k])
                entry["attack"] = disclosure.attack(client, clients, x0[k], x_c[k], y, real, feats, cached, n)
            with parts("repeated releases", f"attacking client {client.id}'s x_c at its releases per image"):
                releases = entry["disclosure"]["releases"]
                entry["attack"].update(
                    disclosure.attack_releases(
                        client, clients, x0[k], y, real, feats, cached, n, releases, stream, entry["attack"]
                    )
                )
            with parts("membership inference", f"inferring membership of client {client.id}'s images"):
                targets = [privacy.client_target(client)] if client.cut.t_c > 0 else []
                if servers_of[k] is not None:
                    targets.insert(0, privacy.server_target(servers_of[k], client))
                if client.global_model is not None:  # federated: the model the server and every client hold
                    own = targets if cfg.federated.finetune_steps else []  # not fine-tuned: its own is the global
                    targets = [privacy.federated_target(client), *own]
                mia = privacy.membership(targets, cfg.clients[k].shard, client.diffusion, n, stream, cfg.eval.batch)
                entry["membership"] = _membership(mia, resamples, seed)
                for model, (members, nonmembers) in mia.items():
                    scores.setdefault(model, ([], []))[0].append(members)
                    scores[model][1].append(nonmembers)
            # the cost of a model on a grid is the same for every client that has both: measured once
            key = (
                repr(cfg.clients[k].model),
                client.batch_size,
                client.condition,
                sampling_key(client),
                client.cut.t_c,
            )
            if cfg.eval.compute:
                if key not in compute_of:
                    with parts("client compute", f"measuring client {client.id}'s compute"):
                        compute_of[key] = client_compute(client, min(n, 16), cfg.eval.timing_repeats)
                entry["compute"] = dict(compute_of[key])
            report[client.id] = entry
            log.info("evaluated client %s: %s", client.id, _line(entry))
    report["pooled"] = {}
    with parts("image quality", "scoring the pooled sets"):
        for name, (reals, fakes) in pooled.items():
            if fakes:
                real, fake = np.concatenate(reals), np.concatenate(fakes)
                report["pooled"][name] = {**quality(real, fake, cfg), "images": len(fake), "real_images": len(real)}
    with parts("membership inference", "inferring membership pooled over the clients"):
        pooled_scores = {model: tuple(map(np.concatenate, s)) for model, s in scores.items()}
        report["pooled"]["membership"] = _membership(pooled_scores, resamples, seed)
    with _signals_after(f"interrupted after the evaluation of round {round_} was written whole to {index}"):
        _write(index, cfg, settings, report, grids, identity, round_, started, parts.seconds)
    log.info("evaluate: what each part took: %s", parts.line())
    log.info("evaluation of round %d written to %s (%.1f s)", round_, index, time.perf_counter() - t0)
    return report


def _membership(scores: dict[str, tuple[np.ndarray, np.ndarray]], resamples: int, seed: int) -> dict:
    """The membership group of a client (or pooled: every client's candidates, one
    threshold): privacy.mia_figures of each model, the candidates per side and the
    models scored."""
    out: dict = {"models": ",".join(scores), "draws": privacy.MIA_STEPS * privacy.MIA_NOISE}
    for model, (members, nonmembers) in scores.items():
        out.update(privacy.mia_figures(model, members, nonmembers, resamples, seed))
        out["members"] = len(members)
    return out


def print_report(report: dict) -> None:
    """FID / KID per client and image set, then disclosure, client compute and what the
    parties could learn (membership, copies; the attacks at the run's releases)."""
    rows = [
        [who, *(f"{entry[s]['fid']:.2f} / {entry[s]['kid_mean']:.4f}" if s in entry else None for s in SETS)]
        for who, entry in report.items()
    ]
    print(f"\n{format_table(['FID / KID mean', *SETS], rows)}")
    if "pooled" in report:
        print(f"({POOLED_FID})")
    for who, entry in report.items():
        if "disclosure" in entry:
            c = entry.get("compute")
            cost = "client compute not measured (eval.compute false)"
            if c:
                cost = f"client sampling time {c['sampling_time_ratio']:.3f} of local-only (ideal "
                cost += f"{c['sampling_ideal_ratio']:.3f})"
            print(f"{who}: {disclosure.describe(entry['disclosure'])}; {cost}")
            print(f"{who}: attack: {attacks.describe(entry['attack'])}")
            print(f"{who}: copies: {privacy.describe_copies(entry)}")
        if "membership" in entry:
            print(f"{who}: membership: {privacy.describe_membership(entry['membership'])}")


def _line(entry: dict) -> str:
    return ", ".join(f"{s} FID {entry[s]['fid']:.2f}" for s in SETS if s in entry)


@contextlib.contextmanager
def _signals_after(done: str) -> Iterator[None]:
    """SIGINT and SIGTERM that come while the block runs arrive when it ends: a record is
    written whole or not begun (an interrupt in between left a record that "did not
    finish" with /metrics pointing into it). The KeyboardInterrupt they raise then says
    ``done`` (what was written), not that nothing was; when the block fails, its error
    goes on instead. Python runs signal handlers in the main thread only, so elsewhere
    the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []

    def hold(number: int, frame) -> None:
        caught.append(number)

    previous = {number: signal.signal(number, hold) for number in (signal.SIGINT, signal.SIGTERM)}
    finished = False
    try:
        yield
        finished = True
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if caught and finished:  # else the block's own error (a full disk) goes on: the process ends with it
            try:
                signal.raise_signal(caught[0])
            except KeyboardInterrupt:
                raise KeyboardInterrupt(done) from None


def _write(
    index: str,
    cfg: Config,
    settings: dict,
    report: dict,
    grids: dict,
    identity: str,
    round_: int,
    started: str,
    seconds: dict,
) -> None:
    """A new evaluate record holding the metrics and what each part took (``seconds``, in
    its totals); /metrics then points at them. The metrics of earlier evaluations stay in
    their records. ``settings``: the keys that differ from the training config."""
    n = begin_record(index, "evaluate", round_, settings, started=started)
    attrs = dict(
        extractor=identity,
        partition=",".join(sorted({inspect_shard(c.shard).partition or "?" for c in cfg.clients})),
        checkpoint_round=round_,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        units=METRIC_UNITS,
    )
    record_metrics(index, n, attrs, report, grids)
    scored = sum(entry[s]["images"] for who, entry in report.items() if who != "pooled" for s in SETS if s in entry)
    took = {f"time_{part.replace(' ', '_')}_s": round(value, 3) for part, value in seconds.items()}
    finish_record(index, n, {"extractor": identity, "images_scored": scored, "clients": len(report) - 1, **took})
