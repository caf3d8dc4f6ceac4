"""The image sets an evaluation scores, made from a run's checkpoint set: each client's
five sets (evaluate.py names them), generated in batches of clients that share a model
and a grid, within the planned number of image-steps."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import h5py
import torch

from collafuse_hpc.config import Config, EvalConfig
from collafuse_hpc.diffusion.split import Cut
from collafuse_hpc.logs import Progress, few
from collafuse_hpc.results.schema import PART_ERRORS, SETS, audit_totals, index_path, lost_part, part_path
from collafuse_hpc.roles.client import Client, finish_samples, sample_alone
from collafuse_hpc.roles.federated import FedHost, sampling_global
from collafuse_hpc.roles.host import batches, sampling_key
from collafuse_hpc.roles.server import Server
from collafuse_hpc.runtime import checkpoint
from collafuse_hpc.runtime.methods import method
from collafuse_hpc.runtime.topology import Topology

log = logging.getLogger("collafuse_hpc")

FROM_SERVER = {"collaborative", "server_at_cut", "server_alone"}  # sets that start from the server's x_h


def load_roles(cfg: Config, round_: int, device: torch.device) -> tuple[dict[int, Server], list[Client]]:
    """Servers by rank and clients by index with the weights of the set of ``round_``
    (weights only: random streams are the evaluation's own), each client counting as
    released what its audit holds too (what left it after that set, Client.count_audited)."""
    topo = Topology.from_config(cfg)
    out = cfg.run.output_dir
    host = method(cfg).host(cfg, list(range(len(cfg.clients))), device)  # one model per shape: sampled together
    clients = host.clients
    servers = {}  # the split servers that sample for a client (a federated client samples the whole chain)
    for rank in sorted({topo.server_of(c.index) for c in clients if c.cut.uses_server}):
        servers[rank] = Server(cfg, topo.clients_of(rank), device)
        servers[rank].net.load_member_state(0, checkpoint.load_rank(out, round_, rank)["state"]["net"])
    states = checkpoint.load_clients(out, round_, [c.id for c in cfg.clients])
    for client in clients:
        client.load_weights(states[client.id])
        part = part_path(out, client.id)
        if os.path.lexists(part):  # a broken link too: its audit is what left the client
            try:
                with h5py.File(part, "r", locking=False) as f:
                    client.count_audited(audit_totals(f))
            except PART_ERRORS:
                why = lost_part(index_path(out), os.path.relpath(part, out))
                raise ValueError(
                    f"client {client.id!r}: its part file {part!r} cannot be read ({why}); evaluate needs its audit "
                    "(how often each image left the client): restore the file"
                ) from None
    if isinstance(host, FedHost):  # what the clients sample with at the end of training
        host.personalize(checkpoint.load_rank(out, round_, 0)["state"]["ema"].to(device), cfg.federated.finetune_steps)
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
    if "global" in sets:
        for i, images in enumerate(_global_samples(clients, n)):
            out[i]["global"] = images
    return [{name: images for name, images in o.items() if name in sets} for o in out]


def _global_samples(clients: list[Client], n: int) -> list[torch.Tensor]:
    """n samples of each federated client with the global model it received instead of its
    fine-tuned one."""
    with sampling_global(clients):
        return sample_alone(clients, n)


def generated_sets(cfg: Config) -> list[str]:
    """The sets of ``eval.sets`` the run's method makes (methods.Method.sets)."""
    made = method(cfg).sets(cfg)
    return [s for s in cfg.eval.sets if s in made]


def check_sets(cfg: Config) -> None:
    """ValueError when ``eval.sets`` holds no set the run's method makes; a warning naming
    those it leaves out of a list the user gave."""
    made = method(cfg).sets(cfg)
    left = [s for s in cfg.eval.sets if s not in made]
    if len(left) == len(cfg.eval.sets):
        raise ValueError(
            f"eval.sets {cfg.eval.sets} holds no image set a {cfg.run.method} run makes: give one of "
            f"{list(made)} (--set eval.sets=[collaborative])"
        )
    if left and cfg.eval.sets != EvalConfig().sets:  # the default lists every method's sets: no news
        log.warning("evaluate: a %s run makes no %s set: left out (it makes %s)", cfg.run.method, left, made)


def image_steps(cut: Cut, sets: list[str]) -> int:
    """Model evaluations per generated image of one client's ``sets``: the server's grid
    (collaborative, server_at_cut, server_alone), the client's grid (collaborative), the
    server continuing alone, the client alone and a federated client's global model (its
    whole grid each)."""
    server, client = (max(0, len(grid) - 1) for grid in cut.sampling_grids())
    full = len(cut.full_chain().sampling_grids()[1]) - 1
    steps = server if FROM_SERVER & set(sets) else 0
    steps += client if "collaborative" in sets else 0
    steps += client if "server_alone" in sets and cut.uses_server else 0
    return steps + full * (("client_alone" in sets) + ("global" in sets))


def planned_images(cfg: Config, cuts: list[Cut]) -> int:
    """Images per set and client: ``eval.images``, or fewer to fit ``eval.max_image_steps``.
    Logs the plan (images x steps) either way."""
    per_image = sum(image_steps(cut, generated_sets(cfg)) for cut in cuts)
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


def image_sets(
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
    progress = Progress(f"evaluating client(s) {few([c.id for c in clients])}", total * len(clients))
    for start in range(0, total, per):
        check()
        n = min(per, total - start)
        for c, made in zip(clients, generate(servers, clients, n, tuple(generated_sets(cfg)))):
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


def sampling_batches(clients: list[Client], images: int, batch: int) -> list[list[Client]]:
    """Clients that generate together (one model, one grid), at most ``batch // images``
    at a time so that the sets of a batch stay about ``batch`` images per pass."""
    size = max(1, batch // max(1, images))
    out = []
    for group in batches(clients, sampling_key):
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out
