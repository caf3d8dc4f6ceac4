"""FedAvg: the baseline a user would run instead of the split (algorithm.md, "Baselines").

One global denoiser over the whole chain, t ~ U{1..T}. Round r: the server sends
theta_r to the round's participants; client k starts from it, takes E local
optimizer steps on its own batches (its AdamW state is its own and stays on the
client) and sends back Delta_k = theta_k - theta_r; the server sets
theta_{r+1} = theta_r + eta_s * sum_k n_k Delta_k / sum_k n_k (FedAvg), or takes
an Adam step on that mean (FedAdam). Weights go out and updates come back;
images and labels never leave a client.

A federated client is a :class:`Client` at c = 1 (the whole chain on its own data)
whose member has the global architecture (both set by :func:`client_config`), so the
hosts, batched local steps, checkpoints and audit of the split method serve this one
too. The clients sample
with the server's EMA of theta; with ``federated.finetune_steps`` F > 0 each
first fine-tunes it on its own data (:func:`personalize`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch

from collafuse_hpc.config import Config, ModelConfig, OptimConfig
from collafuse_hpc.data import EpochSampler
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.roles.client import Client
from collafuse_hpc.roles.host import ClientHost
from collafuse_hpc.runtime.topology import Topology, role_seed
from collafuse_hpc.runtime.wire import Kind, Message, one_client

ADAM_BETAS, ADAM_TAU = (0.9, 0.99), 1e-3  # FedAdam's server moments and adaptivity (Reddi et al. 2021)
SERVER_LR = {"fedavg": 1.0, "fedadam": 0.01}  # eta_s when federated.server_lr is empty


def architecture(cfg: Config) -> tuple[ModelConfig, OptimConfig]:
    """The global model's UNet and the optimizer its clients train it with."""
    if cfg.federated.architecture == "server":
        return cfg.server.model, cfg.server.optim
    return cfg.clients[0].model, cfg.clients[0].optim  # the same for every client (config_rules)


def client_config(cfg: Config) -> Config:
    """``cfg`` as the federated clients run it: each client's cut is the whole chain
    (t_c = T) and its model and optimizer are the global architecture's."""
    model, optim = architecture(cfg)
    whole = {"cut_ratio": None, "cut_step": cfg.diffusion.timesteps, "model": model, "optim": optim}
    return dataclasses.replace(cfg, clients=[dataclasses.replace(c, **whole) for c in cfg.clients])


def initial_weights(cfg: Config) -> torch.Tensor:
    """theta_0, float32 [P]: the global UNet seeded as the split server's is, flattened in
    the order of a Trainable member's row (trainable.py)."""
    model, _ = architecture(cfg)
    classes = cfg.data.num_classes if cfg.clients[0].labels else 0  # labels condition it locally
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(role_seed(cfg.run.seed, "server", 0))
        net = UNet(model, cfg.data.channels, cfg.data.image_size, classes)
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


class FedServer:
    """The federated server: theta (float32 [P]), its EMA (what the clients sample with)
    and FedAdam's moments; it averages the participants' updates, each weighted by the
    n_k its client reports with it (the server never opens a client's data)."""

    def __init__(self, cfg: Config, device: torch.device):
        self.cfg, self.device = cfg, device
        self.clients = list(range(len(cfg.clients)))
        self.theta = initial_weights(cfg).to(device)
        self.ema = self.theta.clone()
        self.exp_avg, self.exp_avg_sq = torch.zeros_like(self.theta), torch.zeros_like(self.theta)
        self.rounds = 0  # aggregations so far

    def message(self, kind: Kind, round_: int, client: int, weights: torch.Tensor) -> Message:
        """A one-client message carrying ``weights`` [P] (WEIGHTS or MODEL)."""
        return one_client(kind, round_, client, self.cfg.diffusion.timesteps, len(weights), weights)

    def aggregate(self, updates: dict[int, torch.Tensor]) -> float:
        """theta_{r+1} from the round's UPDATE payloads {client: [P + 1]: Delta_k, then n_k},
        weighted by n_k; returns the L2 norm of their weighted mean."""
        images = {k: float(u[-1]) for k, u in updates.items()}
        total = sum(images.values())
        mean = torch.zeros_like(self.theta)
        for k in sorted(updates):  # a fixed order: the sum does not depend on arrival
            mean.add_(updates[k][:-1].to(self.device, torch.float32), alpha=images[k] / total)
        f = self.cfg.federated
        lr = SERVER_LR[f.server_optimizer] if f.server_lr is None else f.server_lr
        if f.server_optimizer == "fedavg":
            self.theta.add_(mean, alpha=lr)
        else:
            b1, b2 = ADAM_BETAS
            self.exp_avg.mul_(b1).add_(mean, alpha=1 - b1)
            self.exp_avg_sq.mul_(b2).addcmul_(mean, mean, value=1 - b2)
            self.theta.addcdiv_(self.exp_avg, self.exp_avg_sq.sqrt().add_(ADAM_TAU), value=lr)
        self.rounds += 1
        self.ema.lerp_(self.theta, 1 - self._ema_decay())
        return float(mean.norm())

    def _ema_decay(self) -> float:
        """This round's EMA decay: the product of the per-step decays (with warm-up
        (1+n)/(10+n), as trainable.py's) over the round's E local steps, so the EMA
        averages over as many steps as a client's own EMA would."""
        E, decay = self.cfg.federated.local_steps, architecture(self.cfg)[1].ema_decay
        steps = range((self.rounds - 1) * E + 1, self.rounds * E + 1)
        return math.prod(min(decay, (1 + n) / (10 + n)) for n in steps)

    def state_dict(self) -> dict:
        """theta, its EMA and FedAdam's moments (the server's own tensors, not copies: save
        them before the next :meth:`aggregate`) and the rounds aggregated."""
        return {
            "theta": self.theta,
            "ema": self.ema,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "rounds": self.rounds,
        }

    def load_state_dict(self, state: dict) -> None:
        """KeyError or RuntimeError when ``state`` is not a federated server's of this model."""
        for key in ("theta", "ema", "exp_avg", "exp_avg_sq"):
            if state[key].shape != self.theta.shape:
                saved, model = tuple(state[key].shape), tuple(self.theta.shape)
                raise RuntimeError(f"size mismatch for {key}: saved {saved}, model {model}")
            getattr(self, key).copy_(state[key])
        self.rounds = int(state["rounds"])


class FedClient(Client):
    """A federated client: it sends model updates, never images."""

    def what_leaves(self) -> str:
        local = "; its labels condition its model and stay local" if self.condition else ""
        return "model updates (weights, never images)" + local


class FedHost(ClientHost):
    """The federated clients one rank hosts: split clients at c = 1 with the global
    architecture, which start each round from theta_r and send their update."""

    client_type = FedClient

    def __init__(self, cfg: Config, indices: list[int], device: torch.device):
        super().__init__(client_config(cfg), indices, device)

    def servers(self, topo: Topology) -> list[int]:
        """Every federated client talks to the one server."""
        return [0]

    def start_round(self, weights: dict[int, torch.Tensor]) -> None:
        """Each participant's weights become theta_r ({client index: [P]}); its optimizer
        state stays its own."""
        for c in self.clients:
            if c.index in weights:
                c.net.set_member_weights(c.slot, weights[c.index].to(self.device))

    def train(self, clients: list[Client], round_: int, steps: int) -> dict[int, float]:
        """``steps`` local steps of each of ``clients``, each on a fresh batch of its own,
        batched across them; {client index: its mean loss}."""
        sums = {c.index: 0.0 for c in clients}
        for _ in range(steps):
            for c in clients:
                c.begin_round(round_)  # c = 1: draws the batch, sends nothing
            for k, loss in self.local_steps(clients).items():
                sums[k] += loss
        return {k: s / steps for k, s in sums.items()}

    def update(self, client: Client, round_: int, start: torch.Tensor) -> Message:
        """The UPDATE ``client`` sends after its local steps, recorded in its audit: float32
        [P + 1], theta_k - theta_r and then n_k, its training images (FedAvg's weight,
        which its clients report; exact in float32 below 2^24)."""
        delta = client.net.weights[client.slot] - start.to(self.device)
        payload = torch.cat([delta, delta.new_tensor([len(client.reader)])])
        return client.record(one_client(Kind.UPDATE, round_, client.index, client.cut.t_c, len(payload), payload))

    def personalize(self, model: torch.Tensor, steps: int) -> None:
        """Each client restarts from the final global model ``model`` [P] with a fresh
        optimizer and, for ``steps`` F > 0, fine-tunes it on its own data (its sampling
        copy is then the fine-tuned EMA, warmed up afresh). The data order and random
        stream restart from a seed of the client's own, so the fine-tuned model is the
        same at the end of training and in every evaluation of the run."""
        for c in self.clients:
            c.global_model = model.to(self.device)
            c.net.restart_member(c.slot, c.global_model)
            seed = role_seed(c.cfg.run.seed, "finetune", c.index)
            c.sampler = EpochSampler(len(c.reader), c.batch_size, seed)
            c.generator.manual_seed(seed)
        if steps:
            self.train(self.clients, self.clients[0].cfg.run.rounds, steps)


@contextlib.contextmanager
def sampling_global(clients: list[Client]) -> Iterator[None]:
    """Inside the block the sampling copies of ``clients`` (members of one Trainable, each
    after :meth:`FedHost.personalize`) are the global model each received; their own are
    put back after."""
    net, slots = clients[0].net, [c.slot for c in clients]
    kept = net.ema_weights[slots].clone()
    with torch.no_grad():
        for c in clients:
            net.ema_weights[c.slot].copy_(c.global_model)
    try:
        yield
    finally:
        with torch.no_grad():
            net.ema_weights[slots] = kept
