"""The federated method (run.method: federated): FedAvg's known answers, the weighted
average, placement independence, resume, what crosses the wire, and the config."""

import csv
import re
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, write_config

from collafuse_hpc import cli
from collafuse_hpc.config import from_dict, load
from collafuse_hpc.roles import client as client_module
from collafuse_hpc.roles.client import Client
from collafuse_hpc.roles.federated import FedServer, client_config, initial_weights
from collafuse_hpc.runtime import topology
from collafuse_hpc.runtime.checkpoint import load_rank
from collafuse_hpc.runtime.run import run_in_process
from collafuse_hpc.runtime.wire import Kind

IDS = ["c0", "c1", "c2", "c3"]
ROOT = Path(__file__).resolve().parents[1]


def _federated(shards, out, clients: int = 4, **run) -> dict:
    """A tiny federated config of ``clients`` clients: 2 local steps, fine-tuning 3."""
    raw = tiny_config(shards, out, [0.5] * clients, method="federated", **run)
    raw["federated"] = {"local_steps": 2, "finetune_steps": 3}
    return raw


def _theta(out, rounds: int) -> torch.Tensor:
    return load_rank(str(out), rounds, 0)["state"]["theta"]


def _read(out) -> dict:
    """Per client: its rounds columns, samples (personalized and global) and audit."""
    got = {}
    with h5py.File(out / "results.h5") as f:
        for cid in IDS:
            g = f[f"clients/{cid}"]
            got[cid] = {name: g["rounds"][name][()] for name in ("loss_local", "took_part", "bytes_sent")}
            got[cid]["samples"] = g["samples/images"][()].astype(int)
            got[cid]["global"] = g["samples/images_global"][()].astype(int)
            got[cid]["audit"] = dict(g["audit"].attrs)
        got["server"] = {name: f["server/rounds"][name][()] for name in ("clients", "update_norm")}
    return got


def _assert_same(a: dict, b: dict) -> None:
    assert np.array_equal(a["server"]["clients"], b["server"]["clients"])
    np.testing.assert_allclose(a["server"]["update_norm"], b["server"]["update_norm"], rtol=1e-4)
    for cid in IDS:
        x, y = a[cid], b[cid]
        assert np.array_equal(x["took_part"], y["took_part"]), cid
        np.testing.assert_allclose(x["loss_local"], y["loss_local"], rtol=1e-4, equal_nan=True, err_msg=cid)
        for name in ("samples", "global"):
            assert np.abs(x[name] - y[name]).max() <= 1, (cid, name)
        assert x["audit"] == y["audit"], cid


def test_one_participant_one_step_at_server_lr_1_is_one_local_step(tmp_path, shards):
    """FedAvg's known answer: E = 1, one participant, eta_s = 1: theta_1 is the weights
    the client reaches by one local step of its optimizer from theta_0 (the wire, the
    update's sign, its weight and the server's step all enter)."""
    raw = _federated(shards, tmp_path / "run", clients=2, rounds=1, clients_per_round=1, samples_per_client=1)
    raw["federated"].update(local_steps=1, finetune_steps=0)
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    (k,) = topology.participants(cfg, 0)
    alone = Client(client_config(cfg), k, torch.device("cpu"))
    alone.net.set_member_weights(alone.slot, initial_weights(cfg))
    alone.begin_round(0)
    alone.local_step()
    expected = alone.net.weights[alone.slot]
    assert not torch.equal(expected, initial_weights(cfg))  # it did step
    torch.testing.assert_close(_theta(tmp_path / "run", 1), expected, rtol=0, atol=1e-6)


def test_two_clients_with_equal_updates_train_as_one(tmp_path, shards, monkeypatch):
    """Two clients on one shard with one random stream send equal updates; their
    average is one client's training, round after round (a sum, or weights that do not
    add up to 1, would move twice as far)."""
    one = _federated(shards, tmp_path / "one", clients=1, rounds=3, checkpoint_every=0, samples_per_client=1)
    run_in_process(from_dict(one), resume=False)
    two = _federated(shards, tmp_path / "two", clients=2, rounds=3, checkpoint_every=0, samples_per_client=1)
    two["clients"][1]["shard"] = two["clients"][0]["shard"]
    seed = topology.role_seed
    monkeypatch.setattr(client_module, "role_seed", lambda base, kind, index: seed(base, kind, 0))
    run_in_process(from_dict(two), resume=False)
    torch.testing.assert_close(_theta(tmp_path / "two", 3), _theta(tmp_path / "one", 3), rtol=0, atol=1e-6)


def test_the_average_weights_each_update_by_its_clients_images(tmp_path, shards):
    """Unequal n_k: theta moves by sum n_k Delta_k / sum n_k (not the plain mean), times
    eta_s; FedAdam takes Reddi et al.'s step on that mean, 0.01 by default (1, FedAvg's,
    would move every weight by about 1)."""
    raw = _federated(shards, tmp_path / "run", clients=4)
    raw["federated"]["server_lr"] = 0.5
    server = FedServer(from_dict(raw), torch.device("cpu"))
    n = {0: 430, 3: 283}  # the class shards' training images: unequal
    gen = torch.Generator().manual_seed(0)
    updates = {k: torch.randn(server.theta.shape, generator=gen) for k in (0, 3)}
    sent = {k: torch.cat([u, torch.tensor([float(n[k])])]) for k, u in updates.items()}  # as a client sends it
    before = server.theta.clone()
    server.aggregate(sent)
    mean = (n[0] * updates[0] + n[3] * updates[3]) / (n[0] + n[3])
    torch.testing.assert_close(server.theta, before + 0.5 * mean, rtol=0, atol=1e-6)

    raw["federated"].update(server_optimizer="fedadam", server_lr=None)  # its default step: 0.01
    adam = FedServer(from_dict(raw), torch.device("cpu"))
    start = adam.theta.clone()
    adam.aggregate(sent)
    m, v = 0.1 * mean, 0.01 * mean**2
    torch.testing.assert_close(adam.theta, start + 0.01 * m / (v.sqrt() + 1e-3), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_placement_partial_participation_and_resume_do_not_change_the_run(tmp_path, shards):
    """Four clients, two drawn per round: one per rank, two per rank, and a run stopped
    at round 2 and resumed with another placement give the same updates, losses,
    samples and audit; each client's optimizer state stays its own (a mixed-up state
    would change the losses of the rounds after it)."""
    runs = {}
    for name, per in (("alone", 1), ("together", 2)):
        raw = _federated(shards, tmp_path / name, clients_per_rank=per, clients_per_round=2)
        run_in_process(from_dict(raw), resume=False)
        runs[name] = _read(tmp_path / name)
    took = np.array([runs["alone"][cid]["took_part"] for cid in IDS])
    assert (took.sum(0) == 2).all() and took.any(1).all()
    _assert_same(runs["alone"], runs["together"])
    raw = _federated(shards, tmp_path / "resumed", clients_per_rank=4, clients_per_round=2, rounds=2)
    run_in_process(from_dict(raw), resume=False)
    raw["run"].update(rounds=4, clients_per_rank=1)
    run_in_process(from_dict(raw), resume=True)
    _assert_same(runs["alone"], _read(tmp_path / "resumed"))
    torch.testing.assert_close(_theta(tmp_path / "resumed", 4), _theta(tmp_path / "alone", 4), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_only_weights_and_updates_cross_the_wire_and_the_audit_counts_them(tmp_path, shards, monkeypatch):
    """Each participant receives theta_r and sends one update per round (2 x the model's
    bytes), the final model after training; no image, label or x_c is sent, and the
    audit counts every update as left the client."""
    sent = []
    real = client_module.Client.record

    def spy(self, msg):
        sent.append(msg)
        return real(self, msg)

    monkeypatch.setattr(client_module.Client, "record", spy)
    raw = _federated(shards, tmp_path / "run", clients=2, rounds=3, clients_per_round=1)
    raw["clients"][0]["labels"] = raw["clients"][1]["labels"] = True  # conditioned locally: never sent
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    P = initial_weights(cfg).numel()
    assert [m.kind for m in sent] == [Kind.UPDATE] * 3
    assert all(m.payload.shape == (P + 1,) and m.labels is None for m in sent)  # the update, then n_k
    assert all(int(m.payload[-1]) == {0: 430, 1: 437}[m.parts[0].client] for m in sent)  # its n_k, as it reports it
    with h5py.File(tmp_path / "run/results.h5") as f:
        for k, cid in enumerate(["c0", "c1"]):
            g = f[f"clients/{cid}"]
            rounds = g["rounds"]
            took = rounds["took_part"][()] == 1
            assert (rounds["bytes_sent"][()][took] == [m.nbytes for m in sent if m.parts[0].client == k]).all()
            assert (rounds["bytes_received"][()][took] > 4 * P).all() and (rounds["bytes_sent"][()][~took] == 0).all()
            audit = dict(g["audit"].attrs)
            assert audit["images_sent"] == 0 and audit["messages_sent"] == took.sum()
            assert audit["bytes_sent"] == rounds["bytes_sent"][()].sum()


@pytest.mark.slow
def test_a_split_config_turned_federated_names_the_keys_it_ignores(tmp_path, shards, caplog, capsys):
    """--set run.method=federated on a split config runs; the cuts and shared labels it
    ignores are named once at the start and kept in the run's record. What the run
    prints and inspect shows name the method and what left each client."""
    raw = tiny_config(shards, tmp_path / "run", [0.25, 0.5], rounds=2)
    raw["clients"][0]["share_labels"] = raw["clients"][0]["labels"] = raw["clients"][1]["labels"] = True
    path = write_config(tmp_path / "split.yaml", raw)
    with caplog.at_level("WARNING"):
        args = ["--set", "run.method=federated", "--set", "federated.local_steps=2"]
        assert cli.main(["train", path, "--in-process", *args]) == 0
    warned = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert len(warned) == 1
    assert "clients.*.cut_ratio (client 0: 0.25; client 1: 0.5)" in warned[0]
    assert "clients.*.share_labels (client 0: True)" in warned[0]
    with h5py.File(tmp_path / "run/results.h5") as f:
        ignored = yaml.safe_load(f["records/0"].attrs["ignored"])
    cuts = {"clients.0.cut_ratio": 0.25, "clients.1.cut_ratio": 0.5, "clients.0.share_labels": True}
    assert cuts.items() <= ignored.items()
    assert ignored["clients.0.model.base_channels"] == 8  # the server's architecture is the global model's
    assert not any(key.startswith("server.") for key in ignored)
    out = capsys.readouterr().out
    assert "server 0: averaged 4 updates of 48 images trained by the clients" in out  # 2 rounds x 2 clients
    assert "sent 2 model updates" in out
    assert cli.main(["inspect", str(tmp_path / "run")]) == 0
    shown = capsys.readouterr().out
    assert "federated: fedavg at server_lr 1.0, 2 local steps a round, the server's architecture" in shown
    assert "ignored by run.method 'federated': clients.*.cut_ratio (client 0: 0.25; client 1: 0.5)" in shown
    assert re.search(r"2 rounds, 4 updates averaged, [\d.]+ MB received, [\d.]+ MB sent; compute_s ", shown)
    assert "0 images in 0 training messages, 2 model updates" in shown
    assert "sends model updates (weights, never images); its labels condition its model and stay local" in shown
    assert cli.main(["compare", str(tmp_path / "run/results.h5"), str(tmp_path / "run/results.h5")]) == 0
    compared = capsys.readouterr().out
    assert re.search(r"method +federated +federated", compared) and "- (whole chain)" in compared


@pytest.mark.parametrize(
    "change, fragment",
    [
        (["server.count=2"], "set server.count=1"),
        (["clients.0.labels=true"], "'clients.1.labels' differs"),
        (["federated.architecture=client", "clients.1.model.base_channels=4"], "'clients.1.model' differs"),
        (["federated.local_steps=0"], "'federated.local_steps' must be >= 1"),
        (["federated.server_optimizer=sgd"], "valid: ['fedavg', 'fedadam']"),
    ],
    ids=["two-servers", "labels-differ", "models-differ", "no-local-steps", "unknown-optimizer"],
)
def test_a_federated_config_that_cannot_be_one_global_model_is_refused(tmp_path, shards, change, fragment):
    path = write_config(tmp_path / "run.yaml", _federated(shards, tmp_path / "out", clients=2))
    with pytest.raises(ValueError, match=None) as refused:
        load(path, change)
    assert fragment in str(refused.value)


@pytest.mark.mpi
def test_local_sh_trains_resumes_samples_and_evaluates_as_the_in_process_run(tmp_path, shards):
    """jobs/local.sh (mpirun; one server rank, two client ranks of two clients each)
    trains 2 rounds, resumes to 4 and samples the run folder; evaluate scores it. The
    rounds, samples, audit and global model are the uninterrupted in-process run's."""
    raw = _federated(shards, tmp_path / "mpi", clients_per_rank=2, clients_per_round=3, rounds=2)
    path = write_config(tmp_path / "mpi.yaml", raw)
    local = [str(ROOT / "jobs/local.sh"), "3"]
    for args in (["train", path], ["train", path, "--resume=auto", "--set", "run.rounds=4"]):
        proc = subprocess.run([*local, *args], capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the checkpoint set of round 2" in proc.stderr
    raw["run"].update(output_dir=str(tmp_path / "local"), rounds=4)
    run_in_process(from_dict(raw), resume=False)
    _assert_same(_read(tmp_path / "mpi"), _read(tmp_path / "local"))
    torch.testing.assert_close(_theta(tmp_path / "mpi", 4), _theta(tmp_path / "local", 4), rtol=0, atol=1e-6)
    before = _read(tmp_path / "mpi")
    proc = subprocess.run([*local, "sample", str(tmp_path / "mpi")], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = _read(tmp_path / "mpi")
    for cid in IDS:  # a sample invocation fine-tunes the same model from the same set: the same images
        assert np.abs(again[cid]["samples"] - before[cid]["samples"]).max() <= 1, cid
        assert again[cid]["audit"] == before[cid]["audit"], cid  # sampling sends nothing
    assert cli.main(["evaluate", str(tmp_path / "mpi"), "--set", "eval.sets=[collaborative,global]"]) == 0
    with h5py.File(tmp_path / "mpi/results.h5") as f:
        assert {"collaborative", "global"} <= set(f["metrics/pooled"])


@pytest.mark.mpi
def test_torchrun_trains_resumes_and_samples_as_the_in_process_run(tmp_path, shards):
    """The real torchrun binary, three workers: 2 rounds, a resume to 4 and a sample of the
    run folder give the uninterrupted in-process run's rounds, audit, global model and samples."""
    from test_torchrun import start_torchrun

    raw = _federated(shards, tmp_path / "torchrun", clients_per_rank=2, clients_per_round=3, rounds=2)
    path = write_config(tmp_path / "torchrun.yaml", raw)
    for command, run in (
        (("train",), path),
        (("train", "--resume=auto", "--set", "run.rounds=4"), path),
        (("sample",), str(tmp_path / "torchrun")),
    ):
        proc = start_torchrun(run, tmp_path, command=command)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        if command[0] == "train" and len(command) > 1:
            assert "resuming from the checkpoint set of round 2" in err
            trained = _read(tmp_path / "torchrun")
    raw["run"].update(output_dir=str(tmp_path / "local"), rounds=4)
    run_in_process(from_dict(raw), resume=False)
    _assert_same(trained, _read(tmp_path / "local"))
    torch.testing.assert_close(_theta(tmp_path / "torchrun", 4), _theta(tmp_path / "local", 4), rtol=0, atol=1e-6)
    sampled = _read(tmp_path / "torchrun")
    for cid in IDS:  # a sample invocation fine-tunes the same model from the same set: the same images
        assert np.abs(sampled[cid]["samples"] - trained[cid]["samples"]).max() <= 1, cid
        assert sampled[cid]["audit"] == trained[cid]["audit"], cid  # sampling sends nothing


@pytest.mark.slow
def test_evaluate_scores_the_personalized_and_the_global_model(tmp_path, shards, capsys):
    """A federated run is scored like a split one: its samples (the fine-tuned model's,
    as collaborative) and the global model's beside them when it was fine-tuned; it
    has no model of its own to sample alone. Without fine-tuning the two are one set."""
    from collafuse_hpc.evaluation.evaluate import evaluate

    for name, steps in (("tuned", 3), ("global", 0)):
        raw = _federated(shards, tmp_path / name, clients=2, rounds=2)
        raw["federated"]["finetune_steps"] = steps
        cfg = from_dict(raw)
        run_in_process(cfg, resume=False)
        evaluate(cfg)
        with h5py.File(tmp_path / name / "results.h5") as f:
            sets = {s for s in ("collaborative", "client_alone", "global") if s in f["metrics/c0"]}
            assert sets == ({"collaborative", "global"} if steps else {"collaborative"}), name
            assert "global" in f["metrics/pooled"] if steps else "global" not in f["metrics/pooled"]
            fids = [f[f"metrics/c0/{s}"].attrs["fid"] for s in sorted(sets)]
            assert all(np.isfinite(fids)) and len(set(fids)) == len(fids)
            membership = f["metrics/c0/membership"].attrs  # the global model, which every party holds
            assert 0 <= membership["mia_federated_auc"] <= 1 and "mia_server_auc" not in membership
            assert ("mia_client_auc" in membership) == bool(steps)  # not fine-tuned: its own model is the global
        capsys.readouterr()
        assert cli.main(["compare", str(tmp_path / name / "results.h5")]) == 0
        compared = capsys.readouterr().out
        assert "FID pooled collaborative" in compared and "membership" not in compared  # image sets only
    cfg.eval.sets = ["client_alone"]  # a federated client has no model of its own
    with pytest.raises(ValueError, match="holds no image set a federated run makes"):
        evaluate(cfg)


def test_the_federated_target_is_the_global_model_and_leaves_the_clients_own(tmp_path, shards):
    """Membership inference against the federated model scores with the global model each
    client received, not its fine-tuned copy, which is back in place afterwards."""
    from collafuse_hpc.evaluation.privacy import federated_target
    from collafuse_hpc.roles.federated import FedHost

    cfg = from_dict(_federated(shards, tmp_path / "run", clients=2))
    host = FedHost(cfg, [0, 1], torch.device("cpu"))
    model = initial_weights(cfg)
    host.personalize(model, 2)
    c = host.clients[1]
    own = c.net.ema_weights[c.slot].clone()
    assert not torch.equal(own, model)  # fine-tuned away from the global model
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 20])
    got = federated_target(c).eps(x, t, None)
    reference = Client(client_config(cfg), 1, torch.device("cpu"))
    reference.net.ema_weights[reference.slot].copy_(model)
    torch.testing.assert_close(got, reference.eps_model(True, None)(x, t))
    assert torch.equal(c.net.ema_weights[c.slot], own)


def test_split_clients_record_their_bytes_per_round_under_the_federated_names(tmp_path, shards):
    """Both methods' client rows count bytes_sent and bytes_received per round (what the
    report compares): a split client's are its x_c message and the server's reply, and its
    rows sum to the audit's training messages."""
    raw = tiny_config(shards, tmp_path / "run", [0.25, 1.0], rounds=2, clients_per_round=1)
    run_in_process(from_dict(raw), resume=False)
    with h5py.File(tmp_path / "run/results.h5") as f:
        rows, audit = f["clients/c0/rounds"], f["clients/c0/audit"]
        took = rows["took_part"][()] == 1
        training = audit["kind"][()] == Kind.TRAIN
        assert rows["bytes_sent"][()][took].tolist() == audit["nbytes"][()][training].tolist()
        assert (rows["bytes_received"][()][took] > 0).all() and (rows["bytes_sent"][()][~took] == 0).all()
        assert (f["clients/c1/rounds/bytes_sent"][()] == 0).all()  # c = 1 sends nothing
        assert audit.attrs["sent"] == "x_c at t_c = 5 and sampling requests"
        assert f["clients/c1/audit"].attrs["sent"] == "nothing (c = 1)"


@pytest.mark.slow
def test_the_report_puts_federated_beside_alone_and_split(tmp_path, shards):
    """One evaluated run each of alone (c = 1), split and federated into one report: the
    federated run is a method of its own, compared with the c = 1 run of its seed, and the
    three-way table gives each client's costs (federated: E batches a round, the global
    model's bytes)."""
    from collafuse_hpc.evaluation.evaluate import evaluate

    made = {}
    for name, raw in (
        ("alone", tiny_config(shards, tmp_path / "alone", [1.0, 1.0], rounds=2)),
        ("split", tiny_config(shards, tmp_path / "split", [0.5, 0.5], rounds=2)),
        ("fedavg", _federated(shards, tmp_path / "fedavg", clients=2, rounds=2)),
    ):
        raw["eval"]["compute"] = True  # the report's FLOPs
        cfg = from_dict(raw)
        run_in_process(cfg, resume=False)
        evaluate(cfg)
        made[name] = str(tmp_path / name / "results.h5")
    assert cli.main(["report", *made.values(), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report/table.csv") as f:
        rows = {(r["method"], r["c"], r["who"]): r for r in csv.DictReader(f)}
    fed, alone = rows[("fedavg", "-", "c0")], rows[("split", "1.0", "c0")]
    tuned = rows[("fedavg+ft", "-", "pooled")]  # the fine-tuned clients' samples: a point of their own
    assert fed["fid_collaborative"] == rows[("fedavg", "-", "c0")]["fid_global"]  # the global model's
    assert fed["kid_std_collaborative"] == fed["kid_std_global"]  # its KID's spread too, not the fine-tuned set's
    assert tuned["fid_collaborative"] != rows[("fedavg", "-", "pooled")]["fid_collaborative"]
    # the tiny server and client models are one UNet: a federated round is E = 2 of the alone client's steps
    assert float(fed["train_flops_round"]) == pytest.approx(2 * float(alone["train_flops_round"]))
    assert float(fed["bytes_run"]) > 4 * 2 * initial_weights(from_dict(_federated(shards, tmp_path, 2))).numel()
    assert float(alone["bytes_run"]) == 0
    with open(tmp_path / "report/versus_c1.csv") as f:
        assert {"fedavg", "fedavg+ft", "split"} == {r["method"] for r in csv.DictReader(f)}
    assert "Alone (c = 1), federated and split" in (tmp_path / "report/table.md").read_text()
    assert fed["server_images_per_s"] in ("", "nan")  # a federated server denoises no image
    # a federated run alone is a report too: no split run, so no trade-off over c
    assert cli.main(["report", made["fedavg"], "--out", str(tmp_path / "fed_only")]) == 0
    assert not (tmp_path / "fed_only/tradeoff.png").exists() and (tmp_path / "fed_only/table.csv").exists()


@pytest.mark.slow
def test_local_steps_longer_than_the_message_timeout_are_waited_for(tmp_path, shards, monkeypatch):
    """The server waits for updates while the participants work, and they wait for theta_r
    while the slowest of them works: E steps of a whole model may take longer than
    run.timeout_s, which bounds waits for a message, not for known work."""
    from collafuse_hpc.roles.federated import FedHost

    train = FedHost.train

    def slow(self, clients, round_, steps):
        time.sleep(1.5)  # every participant: E steps of a big model on a slow client
        return train(self, clients, round_, steps)

    monkeypatch.setattr(FedHost, "train", slow)
    raw = _federated(shards, tmp_path / "run", clients=2, rounds=3, timeout_s=0.5, samples_per_client=1)
    run_in_process(from_dict(raw), resume=False)
    with h5py.File(tmp_path / "run/results.h5") as f:
        assert list(f["server/rounds/clients"][()]) == [2, 2, 2]


@pytest.mark.parametrize("method", ["split", "federated"])
def test_a_server_counts_the_bytes_its_clients_count(tmp_path, shards, method):
    """Under both methods a server's row counts each client's message as if sent alone, as
    the clients' rows do: each round its bytes_received is the sum of its clients'
    bytes_sent and its bytes_sent the sum of their bytes_received, and its summary the sum
    of its rows. Two clients share a rank and a message each way, so a count of the
    packed message would be a header short."""
    raw = _federated(shards, tmp_path / "run", rounds=2, clients_per_rank=2, clients_per_round=3, samples_per_client=1)
    raw["run"]["method"] = method
    raw["federated"]["finetune_steps"] = 0
    run_in_process(from_dict(raw), resume=False)
    with h5py.File(tmp_path / "run/results.h5") as f:
        server = {name: f["server/rounds"][name][()] for name in ("round", "bytes_received", "bytes_sent")}
        clients = [{name: f[f"clients/{cid}/rounds"][name][()] for name in server} for cid in IDS]
        summary = dict(f["server/summary"].attrs)
    assert server["round"].tolist() == [0, 1]
    for r in (0, 1):
        sent = sum(c["bytes_sent"][c["round"] == r].sum() for c in clients)
        received = sum(c["bytes_received"][c["round"] == r].sum() for c in clients)
        assert sent > 0 and received > 0
        assert (server["bytes_received"][r], server["bytes_sent"][r]) == (sent, received), r
    assert summary["bytes_received"] == server["bytes_received"].sum()
    assert summary["bytes_sent"] == server["bytes_sent"].sum()


def test_a_resumed_servers_summary_adds_up_its_bytes_and_updates():
    """A role's summary over a resume: a server's bytes sent and updates averaged add up
    like its bytes received; a client's bytes_sent is the audit's over the run already
    (invocation_bytes_sent beside it adds up), so the newest's stands."""
    from collafuse_hpc.results.writer import combine_summaries

    server = combine_summaries([{"rounds_run": 2, "updates": 4, "bytes_received": 10, "bytes_sent": 20}] * 2)
    assert [server[k] for k in ("rounds_run", "updates", "bytes_received", "bytes_sent")] == [4, 8, 20, 40]
    assert "images_per_s" not in server  # a federated server averages; it denoises no image
    client = [{"bytes_sent": 5, "invocation_bytes_sent": 5}, {"bytes_sent": 12, "invocation_bytes_sent": 7}]
    combined = combine_summaries(client)
    assert (combined["bytes_sent"], combined["invocation_bytes_sent"]) == (12, 12)


def _turned_federated(shards, out) -> str:
    """A split config of four clients, three at c = 0.2 and one at 0.5, with the tests' small models."""
    return write_config(out / "split.yaml", tiny_config(shards, out / "run", [0.2, 0.2, 0.2, 0.5]))


def test_config_and_dry_run_warn_of_the_keys_the_method_ignores_grouped_by_key(tmp_path, shards, capsys):
    """``config`` and ``train --dry-run`` say what ``train`` warns of: the keys the method
    ignores, each client key once with the clients of each value, not once per client."""
    path = _turned_federated(shards, tmp_path)
    for command in (["config", path], ["train", path, "--dry-run"]):
        assert cli.main([*command, "--set", "run.method=federated"]) == 0
        err = capsys.readouterr().err
        assert "collafuse-hpc: warning: run.method 'federated' ignores these keys of the config" in err, command
        assert "clients.*.cut_ratio (clients 0-2: 0.2; client 3: 0.5)" in err, command
        assert "clients.*.model.channel_mult (clients 0-3: [1, 2])" in err, command
        assert "clients.0." not in err, command
        assert cli.main(command) == 0  # the split method ignores none of them
        assert "ignores" not in capsys.readouterr().err, command


def _inspected(tmp_path, shards, capsys, server_summary: dict) -> str:
    """What inspect prints of a hand-made federated run: the split config turned federated,
    trained and resumed (two records), its server's part holding ``server_summary``."""
    from collafuse_hpc.config import dump
    from collafuse_hpc.config_rules import ignored_keys
    from collafuse_hpc.results.writer import RoleResults, begin_record, create_index

    cfg = load(_turned_federated(shards, tmp_path), ["run.method=federated"])
    index = str(tmp_path / "results.h5")
    create_index(index, dump(cfg), cfg.run.seed, {"server": "parts/server_0.h5"})
    server = RoleResults(str(tmp_path / "parts/server_0.h5"), {"role": "server", "rank": 0, "host": "h", "pid": 1})
    for n, command in enumerate(("train", "resume")):
        begin_record(index, command, 2 * n, {}, ignored_keys(cfg))
        server.write_summary(n, server_summary, trained=True)
    assert cli.main(["inspect", index]) == 0
    return capsys.readouterr().out


def test_inspect_shows_the_keys_a_record_says_its_method_ignored(tmp_path, shards, capsys):
    """inspect shows each record's ``ignored`` attribute, grouped as the warning is, once
    for records that ignored the same keys (a resume); the record keeps every client's key."""
    from collafuse_hpc.config_rules import ignored_keys

    shown = _inspected(tmp_path, shards, capsys, {"rounds_run": 2})
    assert shown.count("ignored by run.method 'federated': clients.*.cut_ratio (clients 0-2: 0.2; client 3: 0.5)") == 1
    with h5py.File(tmp_path / "results.h5") as f:
        assert yaml.safe_load(f["records/0"].attrs["ignored"]) == ignored_keys(
            load(f"{tmp_path}/split.yaml", ["run.method=federated"])
        )


def test_inspect_says_what_a_federated_server_did_not_its_images_per_second(tmp_path, shards, capsys):
    """The federated server denoises no image: inspect gives its rounds, the updates it
    averaged and its bytes (over both invocations), not the clients' images per second."""
    summary = {"images": 48, "images_per_s": 99.0, "updates": 4, "rounds_run": 2, "bytes_received": 2_000_000}
    shown = _inspected(tmp_path, shards, capsys, {**summary, "bytes_sent": 3_000_000, "time_send_s": 0.5})
    assert "server: rank 0 on h" in shown
    assert "    4 rounds, 8 updates averaged, 4.00 MB received, 6.00 MB sent; send_s 1.0 s" in shown
    assert "images/s" not in shown


def test_the_federated_server_hands_its_state_over_only_for_a_checkpoint_set(tmp_path, shards, monkeypatch):
    """The server's state is taken when a checkpoint set is written, not every round, and
    holds its own tensors, not copies (the set is written before the next round changes them)."""
    taken = []
    real = FedServer.state_dict

    def counted(self):
        taken.append(self.rounds)
        return real(self)

    monkeypatch.setattr(FedServer, "state_dict", counted)
    raw = _federated(shards, tmp_path / "run", clients=2, rounds=3, checkpoint_every=2, samples_per_client=1)
    raw["federated"]["finetune_steps"] = 0
    cfg = from_dict(raw)
    run_in_process(cfg, resume=False)
    assert taken == [2, 3]  # the sets of rounds 2 and 3 (the last)
    server = FedServer(cfg, torch.device("cpu"))
    state = real(server)
    assert all(state[k] is getattr(server, k) for k in ("theta", "ema", "exp_avg", "exp_avg_sq"))


def test_the_method_is_chosen_in_one_place_and_the_loops_share_by_public_names():
    """Below the config's rules, only runtime/methods.py asks which method runs: the roles,
    the diffusion, the runtime and the evaluation ask the Method and the roles it builds
    (what leaves a client, which image sets exist). And no module of the package imports
    another's private names (fed_loops shares the loops' helpers by their public names)."""
    import ast

    package = ROOT / "collafuse_hpc"
    asks, private = [], []
    for path in sorted(package.rglob("*.py")):
        name = str(path.relative_to(package))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                if any(isinstance(s, ast.Attribute) and s.attr == "method" for s in sides):
                    asks.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("collafuse_hpc"):
                names = [a.name for a in node.names]
                private += [f"{name}: {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert [a for a in asks if not a.startswith(("config_rules.py:", "runtime/methods.py:"))] == []
    assert private == []
