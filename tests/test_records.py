"""A run's record is append-only: training, each resume, each ``sample`` and each
``evaluate`` adds its own record, and none overwrites another's samples, metrics or
training summary (results/schema.py: /records)."""

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config, write_config

from collafuse_hpc.cli import main
from collafuse_hpc.config import from_dict
from collafuse_hpc.data.prepare import prepare
from collafuse_hpc.data.sources import read_digits
from collafuse_hpc.evaluation.inception import FIDInceptionV3
from collafuse_hpc.evaluation.sets import load_roles
from collafuse_hpc.results.inspection import sampled_steps


def _attrs(g) -> dict:
    return {k: v.item() if hasattr(v, "item") else v for k, v in g.attrs.items()}


def _inception_file(path) -> str:
    """A randomly initialised FID Inception state dict: a second extractor, no download."""
    torch.manual_seed(0)
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return str(path)


@pytest.mark.slow
def test_sampling_and_evaluating_again_add_records_and_keep_every_other(tmp_path, capsys, caplog):
    # 6 training images a client (one batch) and 4 test images: the Inception evaluate embeds every
    # training image (the copy rates) through the 299 x 299 network, 0.15 s an image on a core (the
    # session's shards hold about 430 a client: 150 s of CPU; 12 a client took 1.5 s more than 6)
    shards = prepare(read_digits(), str(tmp_path / "shards"), 2, "class", size=8, seed=0, train_size=6, test_size=4)
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=4)
    raw["eval"].update(sets=["collaborative"], images=4, kid_subset_size=4)
    cfg = write_config(tmp_path / "run.yaml", raw)
    out = tmp_path / "out"
    assert main(["train", cfg, "--in-process"]) == 0
    with h5py.File(out / "results.h5", "r", locking=False) as f:
        trained = {cid: _attrs(f[f"clients/{cid}/summary"]) for cid in ("c0", "c1")}
        server = _attrs(f["server/summary"])
        first_samples = f["clients/c0/samples/images"][()]
    ddim = ["--set", "diffusion.sampler=ddim", "--set", "diffusion.sampling_steps=5"]
    assert main(["sample", cfg, "--in-process", *ddim]) == 0
    assert main(["sample", cfg, "--in-process", "--set", "diffusion.sampling_steps=10"]) == 0
    assert main(["evaluate", cfg]) == 0
    inception = _inception_file(tmp_path / "inception.pth")
    second = ["--set", "eval.extractor=inception", "--set", f"eval.inception_path={inception}"]
    assert main(["evaluate", cfg, *second]) == 0
    capsys.readouterr()
    assert "mean over the last" in caplog.text and "no rounds trained in this invocation (sampling only)" in caplog.text
    assert "last 0 of" not in caplog.text

    with h5py.File(out / "results.h5", "r", locking=False) as f:
        records = [_attrs(f[f"records/{n}"]) for n in range(5)]
        assert "records/5" not in f
        assert [r["command"] for r in records] == ["train", "sample", "sample", "evaluate", "evaluate"]
        assert all(r["finished"] for r in records)
        assert "diffusion.sampler: ddim" in records[1]["settings"] and "sampling_steps: 5" in records[1]["settings"]
        assert "sampler" not in records[2]["settings"] and "sampling_steps: 10" in records[2]["settings"]
        assert "eval.extractor: inception" in records[4]["settings"]
        assert records[1]["checkpoint_round"] == 4
        for cid in ("c0", "c1"):  # the training summary is the training's
            assert _attrs(f[f"clients/{cid}/summary"]) == trained[cid]
            assert trained[cid]["images"] == 4 * 6 and trained[cid]["images_per_s"] > 0
        assert _attrs(f["server/summary"]) == server
        sets = {n: f[f"clients/c0/records/{n}/samples"] for n in (0, 1, 2)}
        how = {n: (g.attrs["sampler"], int(g.attrs["sampling_steps"])) for n, g in sets.items()}
        assert how == {0: ("ddpm", 0), 1: ("ddim", 5), 2: ("ddpm", 10)}
        np.testing.assert_array_equal(sets[0]["images"][()], first_samples)  # the training's samples are kept
        assert not np.array_equal(sets[1]["images"][()], sets[0]["images"][()])
        np.testing.assert_array_equal(f["clients/c0/samples/images"][()], sets[2]["images"][()])  # the newest
        assert f["metrics"].attrs["extractor"].startswith("inception-") and f["metrics"].attrs["record"] == 4
        assert f["records/3/metrics"].attrs["extractor"] == "pixels"
        assert "fid" in f["records/3/metrics/pooled/collaborative"].attrs
    assert (out / "samples/record1/c0.png").exists() and (out / "samples/record0/c0.png").exists()

    assert main(["inspect", str(out / "results.h5")]) == 0
    text = capsys.readouterr().out
    history = [line for line in text.splitlines() if line.startswith("    ") and ": " in line and " at 20" in line]
    assert [line.split(": ")[1].split()[0] for line in history] == ["train", "sample", "sample", "evaluate", "evaluate"]
    assert main(["compare", str(out / "results.h5"), "--record", "3"]) == 0
    assert "pixels" in capsys.readouterr().out
    assert main(["compare", str(out / "results.h5"), "--record", "1"]) == 2
    err = capsys.readouterr().err
    assert "record 1 is a sample record, which holds no metrics; the records of evaluations are [3, 4]" in err


@pytest.mark.slow
def test_a_resumed_runs_training_summary_sums_its_invocations_and_each_prints_its_own(tmp_path, shards, capsys, caplog):
    """The summary at the end of a resume printed the run's last round as if it trained
    them all ('6 rounds') beside this invocation's images and the whole run's x_c; a
    sample-only run said 'resuming', 'idle' and 0.0 images/s. Each figure is this
    invocation's unless it says 'over the run'."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=3, checkpoint_every=3)
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", cfg, "--in-process"]) == 0
    assert "this invocation trained rounds 1-3 and sampled 4 images per client" in capsys.readouterr().out
    assert main(["train", cfg, "--in-process", "--resume", "--set", "run.rounds=6"]) == 0
    out = capsys.readouterr().out
    assert "this invocation trained rounds 4-6 (resumed from the checkpoint set of round 3)" in out
    assert "server 0: 36 images trained" in out and "sampled 8 images (its part of the chain)" in out
    assert "client 'c0' (t_c=4): 18 images trained" in out and "sent 18 x_c images (0.01 MB), 36 over the run" in out
    caplog.clear()
    assert main(["sample", cfg, "--in-process"]) == 0
    out = capsys.readouterr().out
    assert "sampling from the checkpoint set of round 6" in caplog.text and "resuming" not in caplog.text
    assert "this invocation sampled 4 images per client from the checkpoint set of round 6" in out
    assert "server 0: sampled 8 images" in out and "images/s" not in out and "idle" not in out
    assert "client 'c0' (t_c=4): sampled 4 images in" in out and "sent 0 x_c images (0.00 MB), 36 over the run" in out
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        sent = [_attrs(f[f"clients/c0/records/{n}/summary"])["invocation_images_sent"] for n in (0, 1, 2)]
        assert sent == [18, 18, 0] and _attrs(f["clients/c0/summary"])["invocation_images_sent"] == 36
        assert [f[f"records/{n}"].attrs["command"] for n in (0, 1)] == ["train", "resume"]
        for key in ("server", "clients/c0"):
            first, second = (_attrs(f[f"{key}/records/{n}/summary"]) for n in (0, 1))
            total = _attrs(f[f"{key}/summary"])
            assert total["invocations"] == 2 and total["rounds_run"] == 6
            assert total["images"] == first["images"] + second["images"] > 0
            times = [k for k in total if k.startswith("time_")]
            assert times and all(np.isclose(total[k], first[k] + second[k]) for k in times)


def test_a_run_of_the_schema_before_records_is_read_and_continued(tmp_path, shards, capsys):
    """Schema v2 kept /samples, /summary and /metrics as plain groups: inspect reads it
    (no history), and sampling again moves the old samples aside instead of losing them."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", cfg, "--in-process"]) == 0
    for part in (tmp_path / "out/parts").glob("*.h5"):  # rewrite as version 2 wrote it
        with h5py.File(part, "a") as f:
            if "samples" in f:
                images = f["samples/images"][()]
                del f["samples"]
                f["samples/images"] = images
            del f["records"]
    with h5py.File(tmp_path / "out/results.h5", "a") as f:
        del f["records"]
        f.attrs["schema_version"] = 2
        old = f["clients/c0/samples/images"][()]
    assert main(["inspect", str(tmp_path / "out/results.h5")]) == 0
    assert "samples: [4, 1, 8, 8] uint8" in capsys.readouterr().out
    assert main(["sample", cfg, "--in-process", "--set", "diffusion.sampling_steps=5"]) == 0
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        np.testing.assert_array_equal(f["clients/c0/records/v2/samples/images"][()], old)
        assert f["clients/c0/samples"].attrs["sampling_steps"] == 5
        assert int(f["records/0"].attrs["checkpoint_round"]) == 2


def test_bundle_export_and_convert_inception_never_replace_a_file(tmp_path, shards, capsys):
    """What was made from a file (a bundle sent on, grids in a paper, evaluations scored
    with a network) must keep matching it: a command refuses a target that exists, names
    it, and leaves it as it was."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=2)
    raw["run"]["samples_per_client"] = 4
    assert main(["train", write_config(tmp_path / "run.yaml", raw), "--in-process"]) == 0
    results = str(tmp_path / "out/results.h5")
    assert main(["export", results, "--out", str(tmp_path / "grids")]) == 0
    (tmp_path / "bundle.h5").write_bytes(b"a colleague's copy")
    (tmp_path / "fid.pth").write_bytes(b"the network earlier evaluations used")
    before = {p: p.read_bytes() for p in [*tmp_path.glob("grids/*"), tmp_path / "bundle.h5", tmp_path / "fid.pth"]}
    before[tmp_path / "out/results.h5"] = (tmp_path / "out/results.h5").read_bytes()
    capsys.readouterr()
    grids, fid = str(tmp_path / "grids"), str(tmp_path / "fid.pth")
    refused = {
        "bundle onto a file": (["bundle", results, str(tmp_path / "bundle.h5")], "bundle.h5' exists"),
        "bundle onto the run itself": (["bundle", results, results], "results.h5' exists: it may be the run's own"),
        "export again": (["export", results, "--out", grids], "samples_c0.png', "),
        "export arrays beside": (["export", results, "--out", grids, "--npy"], "samples_c1.png' exist"),
        "convert-inception": (["convert-inception", results, fid], "fid.pth' exists: evaluations"),
    }  # fmt: skip
    for case, (command, message) in refused.items():
        assert main(command) == 2, case
        err = capsys.readouterr().err
        assert message in err and "write elsewhere, or remove" in err, (case, err)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in tmp_path.glob("grids/*")) == ["samples_c0.png", "samples_c1.png"]


def test_every_server_replica_is_linked_bundled_and_inspected(tmp_path, shards, capsys):
    """Each replica's part has its own key (the first's is /server): none is dropped."""
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.4, 0.2, 0.6], rounds=2)
    raw["server"]["count"] = 2
    assert main(["train", write_config(tmp_path / "run.yaml", raw), "--in-process"]) == 0
    results = str(tmp_path / "out/results.h5")
    assert main(["bundle", results, str(tmp_path / "run.h5")]) == 0
    for path in (results, tmp_path / "run.h5"):
        with h5py.File(path, "r", locking=False) as f:
            assert [int(f[key].attrs["rank"]) for key in ("server", "servers/1")] == [0, 1], path
    capsys.readouterr()
    assert main(["inspect", results]) == 0
    text = capsys.readouterr().out
    assert "  server: rank 0 on " in text and "  servers/1: rank 1 on " in text


@pytest.mark.slow
def test_rows_buffered_at_a_checkpoint_survive_a_failure_after_it(tmp_path, shards):
    """Rows are written at every checkpoint set, also between log lines: a resume from
    that set keeps every round before it."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=8, log_every=4, checkpoint_every=2)
    raw["fault"] = {"rank": 0, "round": 3}
    assert main(["train", write_config(tmp_path / "crash.yaml", raw), "--in-process"]) == 1
    raw["fault"] = {}
    assert main(["train", write_config(tmp_path / "run.yaml", raw), "--in-process", "--resume"]) == 0
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        for key in ("server", "clients/c0", "clients/c1"):
            assert list(f[f"{key}/rounds/round"][()]) == list(range(8)), key


@pytest.mark.slow
def test_a_run_of_the_schema_before_records_keeps_its_training_through_every_resume(tmp_path, shards):
    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=2)
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", cfg, "--in-process"]) == 0
    for part in (tmp_path / "out/parts").glob("*.h5"):  # as version 2 wrote it: one summary, no records
        with h5py.File(part, "a") as f:
            del f["records"], f["summary"].attrs["invocations"]
    with h5py.File(tmp_path / "out/results.h5", "a") as f:
        del f["records"]
        f.attrs["schema_version"] = 2
    for rounds in (4, 6):
        assert main(["train", cfg, "--in-process", "--resume", "--set", f"run.rounds={rounds}"]) == 0
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        for key in ("server", "clients/c0"):
            total = _attrs(f[f"{key}/summary"])
            assert (total["rounds_run"], total["invocations"]) == (6, 3), key


def _totals(g) -> dict:
    """The audit rows' totals: what left the client, row by row."""
    a = g["audit"]
    return {
        "images_sent": int(a["images"][()].sum()),
        "messages_sent": len(a["round"]),
        "bytes_sent": int(a["nbytes"][()].sum()),
    }


@pytest.mark.slow
def test_the_audit_keeps_what_left_a_client_through_a_crash_a_resume_and_each_sample(tmp_path, shards):
    """The audit is append-only: rounds trained again after a crash were sent twice and
    each ``sample`` sends a request; its totals, and the count the evaluation's
    mu_composed is computed from, are those of every row."""
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=6, log_every=1, checkpoint_every=4)
    raw["fault"] = {"rank": 1, "round": 5}  # client c0 fails before it sends round 5: rounds 0-4 left it
    assert main(["train", write_config(tmp_path / "crash.yaml", raw), "--in-process"]) == 1
    raw["fault"] = {}
    cfg = write_config(tmp_path / "run.yaml", raw)
    assert main(["train", cfg, "--in-process", "--resume"]) == 0  # from the set of round 4: rounds 4, 5 again
    assert main(["sample", cfg, "--in-process"]) == 0
    assert main(["sample", cfg, "--in-process"]) == 0
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        audit = f["clients/c0/audit"]
        assert list(audit["round"][()]) == [0, 1, 2, 3, 4, 4, 5, 6, 6, 6]
        assert _totals(f["clients/c0"]) == {k: audit.attrs[k] for k in ("images_sent", "messages_sent", "bytes_sent")}
        assert audit.attrs["images_sent"] == 7 * 6 and audit.attrs["messages_sent"] == 10
        # c1 did not fail: it may have sent round 5 before it learned of c0's failure, and then that left it too
        either = ([0, 1, 2, 3, 4, 4, 5, 6, 6, 6], [0, 1, 2, 3, 4, 5, 4, 5, 6, 6, 6])
        assert list(f["clients/c1/audit/round"][()]) in either
    _, clients = load_roles(from_dict(yaml.safe_load((tmp_path / "run.yaml").read_text())), 6, torch.device("cpu"))
    assert clients[0].released["images_sent"] == 7 * 6  # disclosure's release count


def test_a_failed_run_keeps_the_rows_each_rank_logged_before_its_next_flush(tmp_path, shards, monkeypatch):
    """Rows are buffered between flushes (run.log_every). When a rank fails, it and the
    peers that learn of it write what they logged: every finished round's row, and
    everything that left each client, the unfinished round's release too, although no
    flush was due (the audit lost a healthy client's round under load when the stop
    agreement raised before the flush)."""
    from collafuse_hpc.roles.client import Client

    left, record = [], Client.record

    def recorded(self, msg):
        left.append((self.id, msg.round))
        return record(self, msg)

    monkeypatch.setattr(Client, "record", recorded)
    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=6, log_every=100, checkpoint_every=100)
    raw["fault"] = {"rank": 1, "round": 3}  # client c0 fails before it sends round 3
    assert main(["train", write_config(tmp_path / "crash.yaml", raw), "--in-process"]) == 1
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        assert list(f["clients/c0/rounds/round"][()]) == [0, 1, 2]
        for part in ("clients/c1", "server"):  # they may have finished round 3 before they learned of it
            assert list(f[f"{part}/rounds/round"][()])[:3] == [0, 1, 2], part
        for client in ("c0", "c1"):  # c1 may have sent round 3 before it learned: then that left it too
            assert list(f[f"clients/{client}/audit/round"][()]) == [r for who, r in left if who == client]
    assert [r for who, r in left if who == "c0"] == [0, 1, 2]


def test_rows_that_cannot_be_written_on_a_failure_do_not_hide_it(tmp_path, shards, monkeypatch, caplog, capsys):
    """The rows a failing rank still writes are a best effort: when that write fails too (a
    full disk, a broken file), the rank's own failure is what ends the run, named as before."""
    from collafuse_hpc.results.writer import RoleResults

    def broken(self):
        raise ValueError("broken part file")

    raw = tiny_config(shards, tmp_path / "out", [0.25, 0.5], rounds=6, log_every=100, checkpoint_every=100)
    raw["fault"] = {"rank": 1, "round": 3}
    cfg = write_config(tmp_path / "crash.yaml", raw)
    monkeypatch.setattr(RoleResults, "flush", broken)
    assert main(["train", cfg, "--in-process"]) == 1
    assert "rank 1 (client 'c0'): RuntimeError: injected fault at round 3" in capsys.readouterr().err
    assert "could not write the logged rows" in caplog.text and "ValueError: broken part file" in caplog.text


def test_inspect_says_the_steps_each_side_sampled_and_no_loss_a_cut_never_trains(tmp_path, shards, capsys):
    """inspect printed '(ddpm, 0 steps, eta 0.0, ...)' for every client (diffusion.sampling_steps 0
    means T) and 'loss_local -' for a client at c = 0, which trains no step of its own. It says
    the steps as they ran, shared between the server and the client, for c = 0 and 1 (a run),
    and 0.25 and a strided grid (10 of T = 20)."""
    raw = tiny_config(shards, tmp_path / "out", [0.0, 1.0], rounds=1, samples_per_client=2)
    raw["clients"][0]["allow_centralized"] = True
    assert main(["train", write_config(tmp_path / "run.yaml", raw), "--in-process"]) == 0

    def inspected() -> dict[str, list[str]]:
        capsys.readouterr()
        assert main(["inspect", str(tmp_path / "out")]) == 0
        by_role, role = {}, None
        for line in capsys.readouterr().out.splitlines():
            if line.startswith("  clients/"):
                role = line.split()[0].split("/")[1]
            elif role and line.startswith("    "):
                by_role.setdefault(role, []).append(line.strip())
        return by_role

    def line(lines: list[str], start: str) -> str:
        return next(text for text in lines if text.startswith(start))

    roles = inspected()
    assert "(ddpm, 20 steps, all on the server, record 0)" in line(roles["c0"], "samples:")
    assert "(ddpm, 20 steps, all on the client, record 0)" in line(roles["c1"], "samples:")
    assert "loss_local" not in line(roles["c0"], "losses") and "loss_server" in line(roles["c0"], "losses")
    assert "loss_server" not in line(roles["c1"], "losses") and "loss_local" in line(roles["c1"], "losses")
    assert sampled_steps(0, 5, {"timesteps": 20}) == "20 steps: 15 server + 5 client"
    # a strided grid (sample --set diffusion.sampling_steps=10): the step counts each side ran
    assert sampled_steps(10, 5, {"timesteps": 20}) == "10 steps: 8 server + 2 client"
    assert sampled_steps(10, 20, {"timesteps": 20}) == "10 steps, all on the client"
    assert sampled_steps(10, 0, {"timesteps": 20}) == "10 steps, all on the server"
    assert sampled_steps(10, None, {}) == "sampling_steps 10"  # a file without the cut: the setting as given


@pytest.mark.slow  # three invocations of a run: 7 to 11 s on busy cores, over the fast tier's 10 s
@pytest.mark.parametrize("method", ["split", "federated"])
def test_a_stopped_invocation_counts_in_the_runs_summary_and_its_record_is_finished(tmp_path, shards, method):
    """A stop (SIGTERM, SLURM's preemption) after round 2 writes the checkpoint set and
    exits for requeue; it wrote no summary, so after the resume the run's /summary said
    1 invocation and 6 rounds run of 8 (the bytes and images of the stopped rounds gone)
    and the stopped invocation's record stayed unfinished."""
    from collafuse_hpc.runtime.preemption import Preempted, StopRequest
    from collafuse_hpc.runtime.run import run_in_process

    raw = tiny_config(shards, tmp_path / "out", [0.2, 0.5], rounds=8, log_every=1, checkpoint_every=0)
    raw["run"]["method"] = method
    stop = StopRequest()
    stop.signal_name = "SIGTERM"  # as if it came before the first round: the ranks agree on a stop at round 2
    with pytest.raises(Preempted) as stopped:
        run_in_process(from_dict(raw), resume=False, stop=stop)
    assert stopped.value.round == 2
    run_in_process(from_dict(raw), resume=True)
    raw["run"]["rounds"] = 12  # then a stop after a finished invocation: the newest summary is the stopped one's
    with pytest.raises(Preempted):
        run_in_process(from_dict(raw), resume=True, stop=stop)
    with h5py.File(tmp_path / "out/results.h5", "r", locking=False) as f:
        totals = yaml.safe_load(f["records/2"].attrs["totals"])
        assert totals["stopped"] == "SIGTERM after round 10" and "samples_per_client" not in totals  # sampled none
        client = _attrs(f["clients/c0/summary"])
        assert client["bytes_sent"] == _attrs(f["clients/c0/audit"])["bytes_sent"]  # over the run, not the stop's
        assert (client["invocations"], client["rounds_run"]) == (3, 10) and client["images_per_s"] > 0
        stopped = _attrs(f["clients/c0/records/2/summary"])  # its recent loss, not the finished invocation's
        assert stopped["loss_rows"] == 2 and client["loss_rows"] == 2 and "loss_local_recent" in stopped
        record = f["records/0"].attrs
        assert record["finished"] and yaml.safe_load(record["totals"])["rounds_run"] == 2
        for key in ("server", "clients/c0", "clients/c1"):
            first, second, third = (_attrs(f[f"{key}/records/{n}/summary"]) for n in (0, 1, 2))
            total = _attrs(f[f"{key}/summary"])
            assert (first["rounds_run"], second["rounds_run"], total["rounds_run"]) == (2, 6, 10), key
            received = first["bytes_received"] + second["bytes_received"] + third["bytes_received"]
            assert total["bytes_received"] == received > 0, key
        assert client["invocation_bytes_sent"] == _attrs(f["clients/c0/audit"])["bytes_sent"]
