"""Whole runs with every role in one process: privacy invariant, failures,
aggregation modes, resume."""

import re
import time
import types

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config

from collafuse_hpc.config import from_dict
from collafuse_hpc.data import EpochSampler, ShardReader, to_model_range
from collafuse_hpc.diffusion.gaussian import beta_schedule
from collafuse_hpc.runtime.checkpoint import load_rank
from collafuse_hpc.runtime.local_wire import LocalHub, LocalWire
from collafuse_hpc.runtime.loops import RankFailure
from collafuse_hpc.runtime.run import run_in_process
from collafuse_hpc.runtime.topology import Topology, participants, role_seed
from collafuse_hpc.runtime.wire import Kind, PeerFailure


def _losses(out, key):
    with h5py.File(out / "results.h5") as f:
        return {n: f[key]["rounds"][n][()] for n in ("loss_local", "loss_server") if n in f[key]["rounds"]}


def test_privacy_invariant_only_x_c_at_the_cut_leaves_a_client(tmp_path, shards, monkeypatch):
    cfg = from_dict(tiny_config(shards, tmp_path, [0.25, 1.0], rounds=6, checkpoint_every=0))
    sent = []
    original = LocalWire.send

    def recording_send(self, dst, msg):
        if self.rank != 0:
            assert msg.labels is None, "labels leave a client only when it opts in"
            sent.append((self.rank, msg.kind, msg.round, None if msg.payload is None else msg.payload.clone()))
        original(self, dst, msg)

    monkeypatch.setattr(LocalWire, "send", recording_send)
    run_in_process(cfg, resume=False)

    assert {rank for rank, *_ in sent} == {1}, "the c = 1 client (rank 2) must send nothing"
    assert [kind for _, kind, *_ in sent] == [Kind.TRAIN] * 6 + [Kind.SAMPLE_REQUEST]
    # Replay client c0's private batches and check each payload is x_c of them at t_c = 5.
    c0 = cfg.clients[0]
    sampler = EpochSampler(len(ShardReader(c0.shard)), c0.batch_size, role_seed(cfg.run.seed, "client", 0))
    abar = np.cumprod(1 - beta_schedule("linear", 20))[5 - 1]
    residuals = []
    for *_, payload in sent[:6]:
        x0 = to_model_range(ShardReader(c0.shard).read(sampler.next())[0], "cpu")
        assert payload.shape == x0.shape and not torch.allclose(payload, x0, atol=0.05)
        residuals.append((payload - np.sqrt(abar) * x0) / np.sqrt(1 - abar))
    eps = torch.cat(residuals)
    assert abs(eps.mean().item()) < 0.1 and abs(eps.std().item() - 1) < 0.1

    with h5py.File(tmp_path / "results.h5") as f:
        audit = f["clients/c0/audit"]
        assert audit.attrs["images_sent"] == 6 * 6 and audit.attrs["t_c"] == 5
        assert list(audit["kind"][()]) == [int(Kind.TRAIN)] * 6 + [int(Kind.SAMPLE_REQUEST)]
        assert f["clients/c1/audit"].attrs["images_sent"] == 0
        assert f["clients/c0/samples/images"].shape == (4, 1, 8, 8)
        assert f["clients/c0/samples/images"].dtype == np.uint8
        assert f["clients/c0/samples/x_handover"].attrs["t"] == 5


def test_labels_cross_only_for_the_client_that_opts_in(tmp_path, shards, monkeypatch):
    raw = tiny_config(shards, tmp_path, [0.25, 0.25], rounds=3, checkpoint_every=0)
    raw["clients"][0].update(labels=True, share_labels=True)
    raw["clients"][1].update(labels=True)
    cfg = from_dict(raw)
    sent = []
    original = LocalWire.send

    def recording_send(self, dst, msg):
        sent.append((self.rank, msg.kind, msg.labels))
        original(self, dst, msg)

    monkeypatch.setattr(LocalWire, "send", recording_send)
    run_in_process(cfg, resume=False)

    c0 = cfg.clients[0]
    sampler = EpochSampler(len(ShardReader(c0.shard)), c0.batch_size, role_seed(cfg.run.seed, "client", 0))
    c0_train = [labels for rank, kind, labels in sent if rank == 1 and kind == Kind.TRAIN]
    assert len(c0_train) == 3
    for labels in c0_train:
        assert np.array_equal(labels.numpy(), ShardReader(c0.shard).read(sampler.next())[1])
    request = next(labels for rank, kind, labels in sent if rank == 1 and kind == Kind.SAMPLE_REQUEST)
    assert request.shape == (4,) and set(request.tolist()) <= {0, 1, 2}  # c0 holds digits 0-2
    assert all(labels is None for rank, _, labels in sent if rank == 2)
    with h5py.File(tmp_path / "results.h5") as f:
        header, x_c, y = 11 * 8 + 4 * 8, 6 * 8 * 8 * 4, 6 * 8  # the header and the client's row of the parts table
        assert list(f["clients/c0/audit/nbytes"][:3]) == [header + x_c + y] * 3
        assert list(f["clients/c1/audit/nbytes"][:3]) == [header + x_c] * 3


def test_a_failing_client_ends_every_role_with_its_name(tmp_path, shards):
    cfg = from_dict(tiny_config(shards, tmp_path, [0.2, 0.2], fault={"rank": 2, "round": 1}))
    with pytest.raises(RankFailure, match=r"^rank 2 \(client 'c1'\): RuntimeError: injected fault at round 1$"):
        run_in_process(cfg, resume=False)  # returns: the server and c0 ended too
    with h5py.File(tmp_path / "results.h5") as f:  # no role finished: none wrote a summary
        assert [key for key in ("server", "clients/c0", "clients/c1") if "summary" in f[key]] == []


@pytest.mark.slow
def test_sequential_aggregation_and_reference_split(tmp_path, shards):
    base = tiny_config(shards, tmp_path / "a", [0.3, 0.3], rounds=3, checkpoint_every=0)
    run_in_process(from_dict(base), resume=False)
    seq = tiny_config(shards, tmp_path / "b", [0.3, 0.3], rounds=3, checkpoint_every=0)
    seq["server"]["aggregate"] = "sequential"
    run_in_process(from_dict(seq), resume=False)
    ref = tiny_config(shards, tmp_path / "c", [0.3, 0.3], rounds=3, checkpoint_every=0)
    ref["diffusion"]["split"] = "reference"
    run_in_process(from_dict(ref), resume=False)
    steps = [load_rank(str(tmp_path / d), 3, 0)["state"]["net"]["steps"] for d in "abc"]
    assert steps == [3, 6, 3]  # sequential: one server step per client per round
    a, b, c = (_losses(tmp_path / d, "server")["loss_server"] for d in "abc")
    assert np.isfinite(np.concatenate([a, b, c])).all()
    assert not np.allclose(a, c)  # the reference split trains on another target


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, shards):
    full = tiny_config(shards, tmp_path / "full", [0.2, 0.6], rounds=6, checkpoint_every=3)
    run_in_process(from_dict(full), resume=False)
    part = tiny_config(shards, tmp_path / "part", [0.2, 0.6], rounds=3, checkpoint_every=3)
    run_in_process(from_dict(part), resume=False)
    part["run"]["rounds"] = 6
    run_in_process(from_dict(part), resume=True)
    for key in ("server", "clients/c0", "clients/c1"):
        a, b = _losses(tmp_path / "full", key), _losses(tmp_path / "part", key)
        for name in a:
            assert np.allclose(a[name], b[name], equal_nan=True), (key, name)
    with h5py.File(tmp_path / "full/results.h5") as fa, h5py.File(tmp_path / "part/results.h5") as fb:
        assert np.array_equal(fa["clients/c0/samples/images"][()], fb["clients/c0/samples/images"][()])


def test_fresh_run_refuses_to_overwrite_results(tmp_path, shards):
    cfg = tiny_config(shards, tmp_path, [0.5, 0.5], rounds=1)
    run_in_process(from_dict(cfg), resume=False)
    with pytest.raises(ValueError, match="results of an earlier run; pass --resume"):
        run_in_process(from_dict(cfg), resume=False)


def test_the_cause_is_raised_not_a_survivors_echo_of_it(tmp_path, shards):
    cfg = from_dict(tiny_config(shards, tmp_path, [0.2, 0.2], fault={"rank": 0, "round": 2}))
    with pytest.raises(RankFailure, match=r"^rank 0 \(server 0\): RuntimeError: injected fault at round 2$"):
        run_in_process(cfg, resume=False)


def test_a_survivor_sees_peer_failure_naming_the_failed_rank():
    topo = Topology(1, ("c0",))
    hub = LocalHub(topo.world_size, 1, timeout_s=30)
    server, client = (LocalWire(rank, topo.describe, hub, torch.device("cpu")) for rank in (0, 1))
    client.send_error([0], 3, "rank 1 (client 'c0'): RuntimeError: disk on fire")
    with pytest.raises(PeerFailure, match=r"^rank 1 \(client 'c0'\): RuntimeError: disk on fire$"):
        server.recv(1, Kind.TRAIN, 3)
    with pytest.raises(PeerFailure, match=r"rank 0 \(server 0\) timed out waiting for TRAIN of round 4 from rank 1"):
        server.recv(1, Kind.TRAIN, 4, timeout_s=0.05)


def _server_weights(out, rounds, rank):
    return load_rank(str(out), rounds, rank)["state"]["net"]["model"]


@pytest.mark.slow
@pytest.mark.parametrize("per_round", [0, 2], ids=["every-client", "two-per-round"])
def test_two_server_replicas_equal_one_server_with_all_batches(tmp_path, shards, per_round):
    """2 servers x 2 clients (gradient all-reduce) == 1 server with the 4 batches concatenated,
    also when only some clients take part (a replica may have none of them)."""
    one = tiny_config(shards, tmp_path / "one", [0.2, 0.4, 0.2, 0.6], rounds=3, checkpoint_every=0)
    one["run"]["clients_per_round"] = per_round
    run_in_process(from_dict(one), resume=False)
    two = tiny_config(shards, tmp_path / "two", [0.2, 0.4, 0.2, 0.6], rounds=3, checkpoint_every=0)
    two["server"]["count"] = 2
    two["run"]["clients_per_round"] = per_round
    run_in_process(from_dict(two), resume=False)
    reference = _server_weights(tmp_path / "one", 3, 0)
    for rank in (0, 1):
        replica = _server_weights(tmp_path / "two", 3, rank)
        for name, value in reference.items():
            torch.testing.assert_close(replica[name], value, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")
    assert reference["out.2.weight"].abs().sum() > 0  # trained away from its zero init
    for key in ("clients/c0", "clients/c3"):
        np.testing.assert_allclose(
            _losses(tmp_path / "one", key)["loss_server"], _losses(tmp_path / "two", key)["loss_server"], rtol=1e-4
        )


@pytest.mark.slow
def test_waits_for_a_peers_sampling_are_not_bounded_by_the_message_timeout(tmp_path, shards):
    # the server samples 2 x 800 images (about 2.5 s on a quiet core; 2 x 1500 took 4 s more CPU): longer than
    # run.timeout_s, which bounds waits for messages only
    raw = tiny_config(shards, tmp_path, [0.25, 0.5], rounds=2, timeout_s=1, samples_per_client=800)
    t0 = time.perf_counter()
    summaries = run_in_process(from_dict(raw), resume=False)
    assert time.perf_counter() - t0 > 1 and summaries["server_0"]["time_sampling_s"] > 1
    with h5py.File(tmp_path / "results.h5") as f:
        assert f["clients/c1/samples/images"].shape == (800, 1, 8, 8)


@pytest.mark.slow
def test_partial_participation_draws_clients_per_round_and_records_who_took_part(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "full", [0.25, 0.5, 0.25, 1.0], rounds=6, checkpoint_every=3)
    raw["run"]["clients_per_round"] = 2
    cfg = from_dict(raw)
    drawn = [participants(cfg, r) for r in range(6)]
    assert all(len(d) == 2 for d in drawn) and len(set(drawn)) > 1  # a new draw each round
    assert drawn == [participants(from_dict(raw), r) for r in range(6)]  # seeded: the same on every rank
    run_in_process(cfg, resume=False)
    with h5py.File(tmp_path / "full/results.h5") as f:
        for k, cid in enumerate(["c0", "c1", "c2", "c3"]):
            took = f[f"clients/{cid}/rounds/took_part"][()].tolist()
            assert took == [int(k in d) for d in drawn], cid
            assert f[f"clients/{cid}/audit"].attrs["images_sent"] == (6 * sum(took) if k != 3 else 0)
        servers = [sum(1 for k in d if k != 3) for d in drawn]  # c3 (c = 1) never calls the server
        assert f["server/rounds/clients"][()].tolist() == servers
    # resumed half-way, the same draws and the same losses
    part = tiny_config(shards, tmp_path / "part", [0.25, 0.5, 0.25, 1.0], rounds=3, checkpoint_every=3)
    part["run"]["clients_per_round"] = 2
    run_in_process(from_dict(part), resume=False)
    part["run"]["rounds"] = 6
    run_in_process(from_dict(part), resume=True)
    a, b = _losses(tmp_path / "full", "server"), _losses(tmp_path / "part", "server")
    assert np.allclose(a["loss_server"], b["loss_server"], equal_nan=True)


@pytest.mark.slow
def test_a_run_and_an_evaluation_leave_the_callers_global_state_as_it_was(tmp_path, shards):
    """The library draws from its own streams: torch's global RNG, its thread count and
    the warnings filters are the caller's before and after (constructors, a run, evaluate)."""
    import subprocess
    import sys
    import warnings

    from collafuse_hpc.evaluation.evaluate import evaluate

    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.6], rounds=2)
    raw["eval"].update(sets=["collaborative"], images=4, kid_subset_size=4)
    raw["server"]["model"]["dropout"] = 0.1
    torch.manual_seed(123)
    torch.set_num_threads(2)
    rng, filters = torch.get_rng_state(), list(warnings.filters)
    run_in_process(from_dict(raw), resume=False)
    inside: list[int] = []  # evaluate works with run.threads (1), then gives the caller its 2 back
    evaluate(from_dict(raw), lambda: inside.append(torch.get_num_threads()))
    assert torch.equal(torch.get_rng_state(), rng)
    assert inside and set(inside) == {1} and torch.get_num_threads() == 2
    ours = [f for f in warnings.filters if f[1] is not None and "layout contract" in f[1].pattern]
    assert not ours and all(f in warnings.filters for f in filters)  # (torch's lazy imports may add their own)
    code = "import warnings, collafuse_hpc.diffusion.trainable as m; print(sum(m.LAYOUT_WARNING in str(f) for f in "
    code += "warnings.filters))"  # nothing installed at import
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "0"


def test_the_evaluation_at_the_end_runs_at_run_threads_or_every_core_when_auto(tmp_path, shards, monkeypatch):
    """An explicit run.threads holds at the end too: on cores shared with other work, more
    threads spin-wait (a tiny at-end evaluation took over 300 s at 2 threads on 2 busy
    cores). With 0 (auto) the other ranks are done, so it takes every core."""
    import os

    from collafuse_hpc.evaluation import evaluate as module

    asked = []
    monkeypatch.setattr(module, "evaluate", lambda cfg, check, threads: asked.append(threads) or {})
    monkeypatch.setattr(module, "print_report", lambda report: None)
    for threads in (1, 0):
        raw = tiny_config(shards, tmp_path / str(threads), [0.5], rounds=1, threads=threads)
        raw["eval"]["at_end"] = True
        run_in_process(from_dict(raw), resume=False)
    assert asked == [1, len(os.sched_getaffinity(0))]


def test_a_failure_notice_that_cannot_be_sent_is_logged(caplog):
    topo = Topology(1, ("c0",))
    hub = LocalHub(topo.world_size, 1, timeout_s=5)
    wire = LocalWire(1, topo.describe, hub, torch.device("cpu"))

    def closed(dst, msg):
        raise RuntimeError("Connection closed by peer")

    wire.send = closed
    wire.send_error([0], 3, "rank 1: boom")
    assert "could not tell rank 0 (server 0) of this failure: Connection closed by peer" in caplog.text


def test_a_server_whose_clients_are_all_local_says_it_is_idle_and_writes_no_nan_rows(tmp_path, shards, caplog):
    """c = 1 everywhere: the server logs 'idle' instead of 'loss/server nan images/s 0.0',
    records no round rows, and the local-only clients have no server-loss column."""
    cfg = from_dict(tiny_config(shards, tmp_path, [1.0, 1.0], rounds=4, checkpoint_every=0))
    with caplog.at_level("INFO", logger="collafuse_hpc"):
        run_in_process(cfg, resume=False)
    assert "nan" not in caplog.text.lower()
    assert "server 0 round 2/4 idle" in caplog.text and "server_0: idle in the 4 rounds" in caplog.text
    with h5py.File(tmp_path / "results.h5") as f:
        assert "rounds" not in f["server"]
        for cid in ("c0", "c1"):
            rounds = f[f"clients/{cid}/rounds"]
            assert "loss_server" not in rounds and len(rounds["round"]) == 4
            assert not np.isnan(rounds["loss_local"][()]).any()


@pytest.mark.slow
def test_two_server_replicas_equal_one_server_with_dropout(tmp_path, shards):
    """With server dropout, each replica drew its masks from a stream seeded by its rank, so
    2 servers x 2 clients trained other weights than 1 server with the 4 batches (issue 35).
    A client's rows take their masks from a stream of that client's own, on any replica."""
    weights, losses = [], []
    for name, count in (("one", 1), ("two", 2)):
        raw = tiny_config(shards, tmp_path / name, [0.2, 0.4, 0.2, 0.6], rounds=2, checkpoint_every=0)
        raw["server"]["count"] = count
        raw["server"]["model"] = {**raw["server"]["model"], "dropout": 0.3}
        run_in_process(from_dict(raw), resume=False)
        weights.append([_server_weights(tmp_path / name, 2, rank) for rank in range(count)])
        losses.append(_losses(tmp_path / name, "clients/c1")["loss_server"])
    (reference,), replicas = weights
    for rank, replica in enumerate(replicas):
        for name, value in reference.items():
            torch.testing.assert_close(replica[name], value, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def test_a_server_set_of_one_dropout_stream_per_replica_still_loads(tmp_path, shards):
    """Sets written before dropout drew per client hold one stream per replica ('dropout'):
    they load, and each client's dropout stream starts from its seed."""
    from collafuse_hpc.roles.server import Server

    cfg = from_dict(tiny_config(shards, tmp_path, [0.2, 0.4]))
    new = Server(cfg, [0, 1], torch.device("cpu"))
    old = {k: v for k, v in new.state_dict().items() if k != "dropout_clients"}
    old["dropout"] = torch.Generator().manual_seed(5).get_state()
    for k in (0, 1):
        torch.rand(3, generator=new.dropout_streams[k])  # moved on: loading an old set must not keep this
    loaded = Server(cfg, [0, 1], torch.device("cpu"))
    loaded.load_state_dict(old)
    seeded = Server(cfg, [0, 1], torch.device("cpu"))
    for k in (0, 1):
        assert torch.equal(loaded.dropout_streams[k].get_state(), seeded.dropout_streams[k].get_state())
    loaded.load_state_dict(new.state_dict())  # a new set restores each client's stream
    assert all(torch.equal(loaded.dropout_streams[k].get_state(), new.dropout_streams[k].get_state()) for k in (0, 1))


@pytest.mark.slow
def test_a_run_from_before_a_config_key_existed_resumes_samples_and_evaluates(tmp_path, shards):
    """A run trained before run.method and the federated section existed stored a config
    without them; it ran with their defaults, so resume, sample and evaluate take it
    (they refused: "run.method: '(none)' -> 'split'")."""
    from collafuse_hpc import cli
    from collafuse_hpc.runtime import checkpoint

    raw = tiny_config(shards, tmp_path / "old", [0.25, 0.5], rounds=2, checkpoint_every=2)
    run_in_process(from_dict(raw), resume=False)
    for path in (tmp_path / "old/checkpoints").rglob("rank*.pt"):  # as the earlier version wrote them
        ckpt = torch.load(path, weights_only=True)
        old = yaml.safe_load(ckpt["config"])
        del old["run"]["method"], old["federated"]
        ckpt["config"] = yaml.safe_dump(old, sort_keys=False)
        torch.save(ckpt, path)
    assert checkpoint.trained_round(from_dict(raw), "evaluate") == 2
    assert cli.main(["sample", str(tmp_path / "old"), "--in-process"]) == 0
    raw["run"]["rounds"] = 3
    run_in_process(from_dict(raw), resume=True)


def test_a_run_shorter_than_its_log_interval_says_how_its_first_round_went(tmp_path, shards, caplog):
    """With run.log_every = 50 a 10-round run (the federated quickstart) said nothing for six
    minutes: the first round of every invocation is logged at once, then every interval."""
    cfg = from_dict(tiny_config(shards, tmp_path, [0.25, 0.5], rounds=3, log_every=50, checkpoint_every=0))
    with caplog.at_level("INFO", logger="collafuse_hpc"):
        run_in_process(cfg, resume=False)
    assert re.search(r"server 0 round 1/3 loss/server \d", caplog.text) and "round 2/3" not in caplog.text


@pytest.mark.parametrize("method", ["split", "federated"])
def test_the_clients_log_their_local_loss_beside_the_servers(tmp_path, shards, caplog, method):
    """A run logged only the server's loss: the quickstart's user could not see whether the
    clients' models, which make the final images, were learning."""
    from collafuse_hpc.runtime.rounds import log_clients

    raw = tiny_config(shards, tmp_path, [0.25, 0.5], rounds=3, log_every=2, checkpoint_every=0, method=method)
    with caplog.at_level("INFO", logger="collafuse_hpc"):
        run_in_process(from_dict(raw), resume=False)
    for r in (1, 2):  # the first round at once, then every log_every
        for who in ("c0", "c1"):
            assert re.search(rf"clients round {r}/3 loss/local .*{who} \d+\.\d{{4}}", caplog.text), caplog.text[-3000:]
    assert "round 3/3 loss/local" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="collafuse_hpc"):  # a rank of many clients: one line, not one each
        ctx = types.SimpleNamespace(cfg=types.SimpleNamespace(run=types.SimpleNamespace(rounds=10)))
        newest = {f"c{i}": 0.1 * (i + 1) for i in range(5)}
        log_clients(ctx, 4, newest)
        log_clients(ctx, 5, newest)  # none trained since: partial participation shows no stale loss
    assert "clients round 5/10 loss/local mean 0.3000 over 5 clients (0.1000 to 0.5000)" in caplog.text
    assert "round 6/10" not in caplog.text


def test_the_server_says_it_is_still_sampling_when_a_batch_runs_for_long(tmp_path, shards, caplog, monkeypatch):
    """The quickstart's final sampling logged "0/128 images" and then nothing for three
    minutes (a batch's whole chain counts at once): a user saw a hung job."""
    import functools

    from collafuse_hpc.logs import Heartbeat
    from collafuse_hpc.roles.server import Server

    sample = Server.sample

    def slow(self, *args, **kwargs):
        time.sleep(2.0)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(Server, "sample", slow)
    monkeypatch.setattr("collafuse_hpc.runtime.loops.Heartbeat", functools.partial(Heartbeat, every_s=0.5))
    cfg = from_dict(tiny_config(shards, tmp_path, [0.25, 0.5], rounds=1, checkpoint_every=0))
    with caplog.at_level("INFO", logger="collafuse_hpc"):
        run_in_process(cfg, resume=False)
    assert re.search(r"server 0: still sampling \d+ images \(\d s\)", caplog.text), caplog.text[-2000:]


def test_the_clients_say_they_are_still_sampling_when_their_chain_runs_for_long(tmp_path, shards, caplog, monkeypatch):
    """A client's part of the final chain (the whole chain at c = 1) logged nothing while
    it ran: as the server's, a line every 10 s says it is under way."""
    import functools

    from collafuse_hpc.logs import Heartbeat
    from collafuse_hpc.roles import host

    finish = host.finish_samples

    def slow(*args):
        time.sleep(2.0)
        return finish(*args)

    monkeypatch.setattr(host, "finish_samples", slow)
    monkeypatch.setattr(host, "Heartbeat", functools.partial(Heartbeat, every_s=0.5))
    cfg = from_dict(tiny_config(shards, tmp_path, [0.25, 1.0], rounds=1, checkpoint_every=0))
    with caplog.at_level("INFO", logger="collafuse_hpc"):
        run_in_process(cfg, resume=False)
    # in one process one line resets every waiting heartbeat: one client of the two says it
    said = r"client\(s\) c[01]: still sampling \d+ images each for 1 client\(s\) \(\d s\)"
    assert re.search(said, caplog.text), caplog.text[-2000:]
