"""Many clients on few ranks (run.clients_per_rank): the same science as one client
per rank, a checkpoint that resumes with another placement, one message per rank."""

import h5py
import numpy as np
import pytest
import torch
from conftest import run_mpi, tiny_config, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from collafuse_hpc.config import ModelConfig, from_dict
from collafuse_hpc.diffusion.trainable import Trainable
from collafuse_hpc.diffusion.unet import UNet
from collafuse_hpc.runtime.local_wire import LocalWire
from collafuse_hpc.runtime.run import run_in_process
from collafuse_hpc.runtime.wire import Kind, Message, PeerFailure, Wire, one_client, pack, unpack

IDS = ["c0", "c1", "c2", "c3", "c4"]


def _mixed(shards, out, **run) -> dict:
    """Five clients of two model shapes, four cuts (one local only), labels kept, shared
    and unused, three drawn per round, dropout 0.1: every path through a hosting rank."""
    raw = tiny_config(shards, out, [0.25, 0.5, 0.25, 1.0], rounds=4, checkpoint_every=2, clients_per_round=3, **run)
    raw["clients"].append(dict(raw["clients"][0], id="c4", cut_ratio=0.5))
    raw["clients"][0].update(labels=True, share_labels=True)
    raw["clients"][2].update(labels=True)
    raw["clients"][4]["model"] = dict(raw["clients"][4]["model"], base_channels=4)  # a second shape
    for role in [raw["server"], *raw["clients"]]:  # each member's masks from its own stream, saved with it
        role["model"] = dict(role["model"], dropout=0.1)
    return raw


def _read(out) -> dict:
    """Per client: its rounds columns, samples, hand-over and audit totals."""
    got = {}
    with h5py.File(out / "results.h5") as f:
        for cid in IDS:
            g = f[f"clients/{cid}"]
            columns = ("loss_local", "loss_server", "took_part")
            got[cid] = {name: g["rounds"][name][()] for name in columns if name in g["rounds"]}
            got[cid]["samples"] = g["samples/images"][()].astype(int)
            got[cid]["handover"] = g["samples/x_handover"][()] if "x_handover" in g["samples"] else None
            got[cid]["audit"] = dict(g["audit"].attrs)
        got["server"] = {name: f["server/rounds"][name][()] for name in ("loss_server", "clients")}
    return got


# The tests that compare with one_per_rank run on one xdist worker, which trains it once
# (2.5 s of CPU), not once on each worker they would otherwise spread over.
ONE_PER_RANK = pytest.mark.xdist_group("one_per_rank")


@pytest.fixture(scope="module")
def one_per_rank(tmp_path_factory, shards) -> dict:
    """The mixed run with one client per rank, trained once: what the placements below
    are compared with (read by :func:`_read`; not to be changed). Its tests are ONE_PER_RANK."""
    out = tmp_path_factory.mktemp("one_per_rank")
    run_in_process(from_dict(_mixed(shards, out, clients_per_rank=1)), resume=False)
    return _read(out)


def _assert_same(a: dict, b: dict) -> None:
    np.testing.assert_allclose(a["server"]["loss_server"], b["server"]["loss_server"], rtol=1e-4)
    assert np.array_equal(a["server"]["clients"], b["server"]["clients"])
    for cid in IDS:
        x, y = a[cid], b[cid]
        assert np.array_equal(x["took_part"], y["took_part"]), cid
        assert ("loss_server" in x) == ("loss_server" in y), cid
        for name in ("loss_local", "loss_server")[: 1 + ("loss_server" in x)]:
            np.testing.assert_allclose(x[name], y[name], rtol=1e-4, equal_nan=True, err_msg=f"{cid} {name}")
        assert np.abs(x["samples"] - y["samples"]).max() <= 1, cid
        if x["handover"] is not None:
            np.testing.assert_allclose(x["handover"], y["handover"], atol=1e-4)
        assert x["audit"] == y["audit"], cid


@pytest.mark.slow
@ONE_PER_RANK
def test_clients_hosted_together_train_and_sample_as_on_ranks_of_their_own(tmp_path, shards, one_per_rank):
    """One rank per client, all five on one rank, and 2 + 2 + 1: the same losses, samples,
    hand-overs and audit totals (to float tolerance)."""
    runs = {1: one_per_rank}
    for per in (5, 2):
        raw = _mixed(shards, tmp_path / f"per{per}", clients_per_rank=per)
        summaries = run_in_process(from_dict(raw), resume=False)
        assert list(summaries) == ["server_0"] + [f"client_{cid}" for cid in IDS]
        runs[per] = _read(tmp_path / f"per{per}")
    took = np.array([runs[1][cid]["took_part"] for cid in IDS])
    assert (took.sum(0) == 3).all() and took.any(1).all()  # three each round; nobody was skipped throughout
    assert "loss_server" not in runs[1]["c3"]  # c = 1: never calls the server, so no column of NaN
    _assert_same(runs[1], runs[5])
    _assert_same(runs[1], runs[2])


@pytest.mark.slow
@ONE_PER_RANK
def test_a_checkpoint_resumes_with_another_placement(tmp_path, shards, one_per_rank):
    """Stopped after round 2 with one client per rank, resumed with all on one rank
    (and the other way round): the same run as an uninterrupted one, but for the audit,
    which also counts the stopped run's sample request."""
    reference = one_per_rank
    for first, then in ((1, 5), (5, 2)):
        out = tmp_path / f"from{first}to{then}"
        part = _mixed(shards, out, clients_per_rank=first)
        part["run"]["rounds"] = 2
        run_in_process(from_dict(part), resume=False)
        part["run"].update(rounds=4, clients_per_rank=then)
        run_in_process(from_dict(part), resume=True)
        got = _read(out)
        for cid in IDS:  # the stopped run's sample request left the client too: its audit counts it
            sent, alone = got[cid]["audit"], reference[cid]["audit"]
            assert sent["messages_sent"] == alone["messages_sent"] + (cid != "c3"), cid  # c3 (c = 1) sends none
            assert sent["images_sent"] == alone["images_sent"], cid
            got[cid]["audit"] = alone
        _assert_same(reference, got)


def test_a_rank_sends_one_message_per_server_and_round(tmp_path, shards, monkeypatch):
    """Four clients on one rank, two servers: the rank sends each server one TRAIN per
    round carrying the x_c of every client that server serves; labels only of the
    client that opts in, and a reply per server carrying each client's loss."""
    raw = tiny_config(shards, tmp_path, [0.25, 0.5, 0.25, 0.5], rounds=2, checkpoint_every=0, clients_per_rank=4)
    raw["server"]["count"] = 2
    raw["clients"][1].update(labels=True, share_labels=True)
    sent = []
    original = LocalWire.send

    def recording_send(self, dst, msg):
        sent.append((self.rank, dst, msg))
        original(self, dst, msg)

    monkeypatch.setattr(LocalWire, "send", recording_send)
    run_in_process(from_dict(raw), resume=False)
    # rank 2 hosts clients 0..3; client k is served by server k mod 2
    train = {(src, dst, m.round): m for src, dst, m in sent if m.kind == Kind.TRAIN}
    assert sorted(train) == [(2, 0, 0), (2, 0, 1), (2, 1, 0), (2, 1, 1)]
    for (_, dst, _), m in train.items():
        assert [p.client for p in m.parts] == [dst, dst + 2] and m.payload.shape == (12, 1, 8, 8)
        assert [p.labels for p in m.parts] == [dst == 1, False]
        assert (m.labels is None) == (dst == 0) and (m.labels is None or m.labels.shape == (6,))
    replies = [m for src, dst, m in sent if m.kind == Kind.TRAIN_REPLY]
    assert len(replies) == 4 and all(m.payload.shape == (2,) and len(m.parts) == 2 for m in replies)


def test_pack_and_unpack_keep_each_clients_share():
    a = one_client(Kind.TRAIN, 3, 0, 5, 2, torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]))
    b = one_client(Kind.TRAIN, 3, 7, 9, 3, torch.ones(3, 1, 4, 4))
    msg = pack([a, b])
    assert msg.count == 5 and [p.client for p in msg.parts] == [0, 7] and msg.labels.tolist() == [1, 2]
    assert msg.nbytes == a.nbytes + b.nbytes - 11 * 8  # one header for both
    back = unpack(msg)
    assert back[7].t_c == 9 and back[7].labels is None and back[7].payload.sum() == 48
    assert back[0].labels.tolist() == [1, 2] and back[0].payload.shape == (2, 1, 4, 4)
    wire = Wire()
    wire.rank, wire.describe = 0, lambda r: f"rank {r}"
    with pytest.raises(PeerFailure, match=r"expected TRAIN of round 3 for clients \[0, 5\] from rank 2, got"):
        wire.split(2, msg, [0, 5])
    broken = Message(Kind.TRAIN, 3, msg.parts, 5, msg.payload[:4], msg.labels)
    with pytest.raises(PeerFailure, match="rank 2 sent a malformed TRAIN"):
        wire.split(2, broken, [0, 7])


def test_members_step_on_their_own():
    """A Trainable of 3 members stepping members 0 and 2 moves only them, and each
    moves as a model of its own (torch's AdamW and clip_grad_norm_) would."""
    from collafuse_hpc.config import ModelConfig, OptimConfig

    model_cfg = ModelConfig(base_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[])
    optim = OptimConfig(lr=1e-2, weight_decay=0.1, grad_clip=0.5, ema_decay=0.9)
    torch.manual_seed(0)
    net = Trainable(UNet(model_cfg, 1, 8, members=3), optim, torch.device("cpu"))
    singles = []
    for j in range(3):
        single = UNet(model_cfg, 1, 8)
        single.load_state_dict({n: v[None] for n, v in net.member_state(j)["model"].items()})  # K = 1
        singles.append((single, torch.optim.AdamW(single.parameters(), lr=1e-2, weight_decay=0.1)))
    before = net.member_state(1)
    x, t = torch.randn(4, 2, 8, 8), torch.randint(0, 20, (4, 2))
    for _ in range(3):
        out = net.forward(x, t, members=[0, 2])
        net.step(out.pow(2).mean(dim=(0, 2, 3)).sum() * 50, members=[0, 2])
        for j, col in ((0, 0), (2, 1)):
            model, opt = singles[j]
            opt.zero_grad()
            (model(x[:, col : col + 1], t[:, col]).pow(2).mean() * 50).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
    after = net.member_state(1)
    assert after["steps"] == 0 and all(torch.equal(after["model"][n], v) for n, v in before["model"].items())
    assert all(torch.equal(after["ema"][n], v) for n, v in before["ema"].items())
    for j in (0, 2):
        state = net.member_state(j)
        assert state["steps"] == 3
        for name, value in singles[j][0].state_dict().items():
            torch.testing.assert_close(state["model"][name], value[0], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.mpi
@ONE_PER_RANK
def test_hosted_clients_under_mpirun_match_in_process(tmp_path, shards, one_per_rank):
    """Five clients on two client ranks under mpirun == one rank per client in process."""
    raw = _mixed(shards, tmp_path / "dist", clients_per_rank=3)
    proc = run_mpi(3, ["train", write_config(tmp_path / "run.yaml", raw)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "launch: mpi, 3 ranks (1 servers, 5 clients)" in proc.stderr
    _assert_same(one_per_rank, _read(tmp_path / "dist"))


def test_a_rank_raises_its_open_file_limit_for_its_clients_shards(monkeypatch):
    from collafuse_hpc.roles import host

    limits = {"now": (100, 5000)}
    monkeypatch.setattr(host.resource, "getrlimit", lambda _: limits["now"])
    monkeypatch.setattr(host.resource, "setrlimit", lambda _, value: limits.update(now=value))
    host._allow_open_files(1256)
    assert limits["now"] == (1256, 5000)
    limits["now"] = (100, 1000)
    with pytest.raises(ValueError, match=r"about 1256 open files, but the hard limit is 1000 .*clients_per_rank"):
        host._allow_open_files(1256)


@pytest.mark.slow
def test_evaluation_generates_the_sets_of_clients_with_one_model_and_grid_together(tmp_path, shards, caplog):
    from collafuse_hpc.evaluation.evaluate import evaluate

    caplog.set_level("INFO", logger="collafuse_hpc")
    raw = tiny_config(shards, tmp_path, [0.25, 0.25, 0.25, 0.5], rounds=2, clients_per_rank=4)
    raw["eval"]["sets"] = ["collaborative", "client_alone"]  # the server's and the clients' sampling
    run_in_process(from_dict(raw), resume=False)
    report = evaluate(from_dict(raw))  # eval.batch 16, 8 images each: two clients per pass
    assert "evaluating client(s) c0, c1: 16/16 images" in caplog.text
    assert "evaluating client(s) c2: 8/8 images" in caplog.text and "evaluating client(s) c3: 8/8" in caplog.text
    for cid in ("c0", "c1", "c2", "c3"):
        assert np.isfinite(report[cid]["collaborative"]["fid"]) and report[cid]["collaborative"]["images"] == 8
    raw["eval"]["batch"] = 8  # one client per pass: each client's images and scores are the same
    alone = evaluate(from_dict(raw))
    assert "evaluating client(s) c1: 8/8 images" in caplog.text
    with h5py.File(tmp_path / "results.h5") as f:
        for cid in ("c0", "c1", "c2", "c3"):
            for name in ("collaborative", "client_alone"):
                together, apart = (f[f"records/{n}/metrics/{cid}/{name}/images"][()] for n in (1, 2))
                assert np.array_equal(together, apart), (cid, name)
                assert alone[cid][name]["fid"] == pytest.approx(report[cid][name]["fid"], rel=1e-6)


def test_labels_for_another_batch_than_the_images_are_refused_by_name():
    """Labels made for one batch and run on another failed deep in a reshape ('shape [1, 1]
    is invalid for input of size 8'); the model says what does not match."""
    cfg = ModelConfig(base_channels=8, channel_mult=[1], num_res_blocks=1, attention_resolutions=[])
    for members, y in ((1, torch.zeros(8, dtype=torch.long)), (2, torch.zeros(8, 2, dtype=torch.long))):
        net = UNet(cfg, 1, 8, num_classes=10, members=members)
        x, t = torch.zeros(1, members, 8, 8), torch.ones(1, members, dtype=torch.long)
        with pytest.raises(ValueError, match="8 labels per member for a batch of 1 images"):
            net(x, t, y=y)


def test_a_members_dropout_masks_do_not_depend_on_who_shares_its_call():
    """Member 0 alone, and beside a second member, with the same stream: the same output
    in train mode (the masks were one draw over [N, K*C, H, W] before: 0.40 apart)."""
    cfg = ModelConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], dropout=0.5)
    torch.manual_seed(0)
    pair = UNet(cfg, 1, 8, members=2).train()
    alone = UNet(cfg, 1, 8, members=1).train()
    with torch.no_grad():
        for w, w1 in zip(pair.parameters(), alone.parameters()):
            w1.copy_(w[:1])
            w[0].add_(torch.randn_like(w[0]) * 0.1)  # non-zero everywhere, so dropout shows
            w1.copy_(w[:1])
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 7, 9])
    pair.streams[:] = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    alone.streams[:] = [torch.Generator().manual_seed(1)]
    both = pair(torch.cat([x, torch.randn(3, 1, 8, 8)], 1), torch.stack([t, t], 1))
    one = alone(x, t)
    torch.testing.assert_close(both[:, :1], one)
    alone.streams[:] = [torch.Generator().manual_seed(1)]
    assert not torch.allclose(alone.eval()(x, t), one)  # dropout was on in train mode
    with pytest.raises(RuntimeError, match="one random stream per member"):
        alone.train().streams.clear() or alone(x, t)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 1000), st.booleans()),
        min_size=1,
        max_size=6,
        unique_by=lambda p: p[1],
    ),
    st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    st.integers(0, 10_000),
)
def test_pack_then_the_wire_encoding_then_unpack_gives_every_clients_message_back(parts, dtype, round_):
    """Any clients (count 0..4 images, any index, labels or not) in one message: its header
    and parts table encode and decode, and unpack returns each client's message as sent."""
    from collafuse_hpc.runtime.wire import decode_header, decode_parts, encode_header, encode_parts

    g = torch.Generator().manual_seed(round_)
    msgs = []
    for count, client, labelled in parts:
        payload = torch.randn(count, 1, 4, 4, generator=g).to(dtype)
        labels = torch.randint(0, 10, (count,), generator=g) if labelled else None
        msgs.append(one_client(Kind.TRAIN, round_, client, client % 7, count, payload, labels))
    msg = pack(msgs)
    header = decode_header(encode_header(msg, 3), 3)
    assert (header.kind, header.round, header.count, header.payload_dtype) == (Kind.TRAIN, round_, msg.count, dtype)
    if msg.parts:
        assert decode_parts(encode_parts(msg)) == tuple(msg.parts)
    back = unpack(msg) if len(msgs) > 1 else {msgs[0].parts[0].client: msgs[0]}
    for m in msgs:
        got = back[m.parts[0].client]
        assert got.count == m.count and got.t_c == m.t_c and torch.equal(got.payload, m.payload)
        assert (got.labels is None) == (m.labels is None) and (m.labels is None or torch.equal(got.labels, m.labels))
