"""Config loading: types, unknown keys, ranges, files, overrides, roles."""

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, write_config
from hypothesis import given, settings
from hypothesis import strategies as st

from collafuse_hpc.config import load
from collafuse_hpc.diffusion.split import cuts
from collafuse_hpc.runtime.topology import Topology


@pytest.fixture
def cfg_file(tmp_path, shards):
    return lambda **changes: write_config(
        tmp_path / "run.yaml", {**tiny_config(shards, tmp_path / "out", [0.2, 0.5]), **changes}
    )


def test_valid_config_loads_with_defaults_and_cut_steps(cfg_file):
    cfg = load(cfg_file())
    assert cfg.diffusion.split == "markov" and cfg.server.aggregate == "concat"
    assert [cut.t_c for cut in cuts(cfg)] == [4, 10]


def test_unknown_key_names_it_and_lists_valid_keys(cfg_file):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stepz'\] in section 'diffusion'.*timesteps"):
        load(cfg_file(diffusion={"stepz": 3}))
    with pytest.raises(ValueError, match=r"\['round'\] in section 'run' \(did you mean 'rounds'\?\); valid keys"):
        load(cfg_file(), ["run.round=5"])
    with pytest.raises(ValueError, match=r"mean 'cut_ratio' for 'cut_rato', 'share_labels' for 'sahre_labels'\?"):
        load(cfg_file(), ["clients.0.cut_rato=0.5", "clients.0.sahre_labels=true"])
    with pytest.raises(ValueError, match=r"\['sever'\] in the top level \(did you mean 'server'\?\)"):
        load(cfg_file(sever={}))
    with pytest.raises(ValueError, match=r"\[True, 'stepz'\] in section 'diffusion'; valid keys"):  # YAML's `on:`
        load(cfg_file(diffusion={True: 1, "stepz": 3}))


def test_wrong_type_names_the_key(cfg_file):
    with pytest.raises(TypeError, match="'run.rounds' must be int, got str"):
        load(cfg_file(), ["run.rounds=many"])


def test_cut_ratio_outside_unit_interval_is_rejected(cfg_file):
    with pytest.raises(ValueError, match=r"'clients.1.cut_ratio' must be in \[0, 1\], got 1.5"):
        load(cfg_file(), ["clients.1.cut_ratio=1.5"])


def test_missing_shard_names_key_and_file(cfg_file):
    with pytest.raises(ValueError, match="'clients.0.shard': file 'nowhere.h5' not found"):
        load(cfg_file(), ["clients.0.shard=nowhere.h5"])


def test_centralized_cut_needs_explicit_opt_in(cfg_file):
    with pytest.raises(ValueError, match="allow_centralized"):
        cuts(load(cfg_file(), ["clients.0.cut_ratio=0"]))
    assert cuts(load(cfg_file(), ["clients.0.cut_ratio=0", "clients.0.allow_centralized=true"]))[0].t_c == 0


def test_bad_choice_lists_valid_values(cfg_file):
    with pytest.raises(ValueError, match=r"'server.aggregate' is 'mean'; valid: \['concat', 'sequential'\]"):
        load(cfg_file(), ["server.aggregate=mean"])


def test_override_of_a_missing_list_item_is_an_error(cfg_file):
    with pytest.raises(ValueError, match="no list item 7"):
        load(cfg_file(), ["clients.7.cut_ratio=0.3"])


def test_missing_config_file_is_named():
    with pytest.raises(ValueError, match="config file 'absent.yaml' not found"):
        load("absent.yaml")


def test_world_size_must_match_roles(cfg_file):
    cfg = load(cfg_file())
    topo = Topology.from_config(cfg, 3)
    assert topo.is_server(0) and topo.clients_on(2) == [1] and topo.server_of(1) == 0
    assert topo.describe(1) == "rank 1 (client 'c0')"
    with pytest.raises(ValueError, match=r"world size 4 does not match.*mpirun -np 3"):
        Topology.from_config(cfg, 4)


def test_clients_per_rank_places_clients_in_blocks(tmp_path, shards):
    """7 clients, 3 per rank, 2 servers: client ranks 2, 3, 4 host [0 1 2] [3 4 5] [6];
    each client keeps its server (k mod 2) whichever rank hosts it."""
    from collafuse_hpc.config import from_dict
    from collafuse_hpc.config_rules import validate

    raw = tiny_config(shards, tmp_path, [0.5] * 4, clients_per_rank=3)
    raw["clients"] = [dict(raw["clients"][k % 4], id=f"c{k}") for k in range(7)]
    raw["server"]["count"] = 2
    topo = Topology.from_config(from_dict(raw), 5)
    assert [topo.clients_on(r) for r in (2, 3, 4)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [topo.rank_of(k) for k in range(7)] == [2, 2, 2, 3, 3, 3, 4]
    assert [topo.server_of(k) for k in range(7)] == [0, 1, 0, 1, 0, 1, 0]
    assert topo.describe(2) == "rank 2 (clients 'c0'..'c2')" and topo.describe(4) == "rank 4 (client 'c6')"
    with pytest.raises(ValueError, match=r"2 server rank\(s\) \+ 3 client rank\(s\) \(7 clients, 3 per rank\)"):
        Topology.from_config(from_dict(raw), 9)
    raw["clients"][4]["device"] = "cuda"
    with pytest.raises(ValueError, match=r"clients 'c3'..'c5' share a rank .* different device values"):
        validate(from_dict(raw))
    raw["clients"][4]["device"] = "cpu"
    raw["clients"][6]["wire_dtype"] = "bfloat16"  # alone on its rank: fine
    validate(from_dict(raw))
    raw["clients"][5]["wire_dtype"] = "bfloat16"  # x_c of one message share a dtype
    with pytest.raises(ValueError, match=r"clients 'c3'..'c5' share a rank .* different wire_dtype values"):
        validate(from_dict(raw))
    raw["run"]["clients_per_rank"] = 0
    with pytest.raises(ValueError, match="run.clients_per_rank' must be >= 1"):
        validate(from_dict(raw))


@pytest.mark.parametrize("name", ["quickstart", "study_digits", "celeba64", "cub64"])
def test_shipped_configs_are_valid(name):
    cfg = load(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"), check_files=False)
    assert Topology.from_config(cfg).world_size == 1 + len(cfg.clients)


def test_star_override_sets_every_client(cfg_file):
    cfg = load(cfg_file(), ["clients.*.cut_ratio=0.6", "clients.*.batch_size=3"])
    assert [c.cut_ratio for c in cfg.clients] == [0.6, 0.6] and [c.batch_size for c in cfg.clients] == [3, 3]


def _template_config(tmp_path, shards, template: dict, extra: list | None = None) -> dict:
    raw = tiny_config(shards, tmp_path / "out", [0.5], rounds=2)
    folder = Path(shards[0]).parent
    raw["clients"] = [*(extra or []), {"template": {"id": "t{k}", "shard": str(folder / "client_{k}.h5"), **template}}]
    return raw


def test_a_client_template_expands_into_validated_clients(tmp_path, shards):
    model = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
    template = {
        "count": 4,
        "cut_ratio": {"choice": [0.25, 0.5, 1.0], "seed": 3},
        "batch_size": {"each": [2, 3, 4, 5]},
        "model": model,
    }
    hand = {"id": "solo", "shard": shards[0], "cut_ratio": 0.5, "batch_size": 6, "model": model}
    path = write_config(tmp_path / "run.yaml", _template_config(tmp_path, shards, template, [hand]))
    cfg = load(path)
    assert [c.id for c in cfg.clients] == ["solo", "t0", "t1", "t2", "t3"]
    assert [c.shard for c in cfg.clients[1:]] == shards
    assert [c.batch_size for c in cfg.clients[1:]] == [2, 3, 4, 5]
    assert all(c.model.channel_mult == [1, 2] for c in cfg.clients)
    drawn = [[0.25, 0.5, 1.0][p] for p in np.random.default_rng(3).integers(3, size=4)]  # the seeded rule
    assert [c.cut_ratio for c in cfg.clients[1:]] == drawn
    assert Topology.from_config(cfg).world_size == 6


@pytest.mark.parametrize(
    "template,message",
    [
        ({"count": 0}, r"'clients.0.template.count' must be an integer >= 1, got 0"),
        (
            {"count": 2, "batch_size": {"each": [1]}},
            r"'clients.0.template.batch_size.each' must be a list of count = 2",
        ),
        ({"count": 2, "cut_ratio": {"choice": []}}, r"'clients.0.template.cut_ratio': a seeded rule is"),
        ({"count": 2, "id": "same"}, r"'clients.0.template.id' must contain \{k\}"),
        ({"count": 5}, r"'clients.4.shard': file '.*client_4.h5' not found"),  # validated like hand-written clients
        ({"count": 2, "cut_ratio": 1.5}, r"'clients.0.cut_ratio' must be in \[0, 1\], got 1.5"),
    ],
)
def test_a_bad_client_template_names_the_key(tmp_path, shards, template, message):
    raw = _template_config(tmp_path, shards, {"cut_ratio": 0.5, **template})
    with pytest.raises(ValueError, match=message):
        load(write_config(tmp_path / "run.yaml", raw))


def test_a_run_from_a_client_template(tmp_path, shards):
    from collafuse_hpc.runtime.run import run_in_process

    model = {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": []}
    template = {"count": 3, "cut_ratio": {"each": [0.25, 0.5, 1.0]}, "batch_size": 4, "model": model}
    cfg = load(write_config(tmp_path / "run.yaml", _template_config(tmp_path, shards, template)))
    summaries = run_in_process(cfg, resume=False)
    assert [summaries[f"client_{c.id}"]["t_c"] for c in cfg.clients] == [5, 10, 20]


def test_the_shipped_many_clients_config_places_64_clients_on_3_ranks():
    cfg = load(str(Path(__file__).parents[1] / "configs/many_digits.yaml"), check_files=False)
    topo = Topology.from_config(cfg, 3)
    assert len(cfg.clients) == 64 and topo.clients_on(2) == list(range(32, 64))
    assert {c.cut_ratio for c in cfg.clients} == {0.2, 0.4} and cfg.run.clients_per_round == 16


@settings(max_examples=100, deadline=None)
@given(
    before=st.integers(0, 3),
    count=st.integers(1, 40),
    after=st.integers(0, 3),
    seed=st.integers(0, 2**32 - 1),
    batch=st.lists(st.integers(1, 64), min_size=1, max_size=1),
)
def test_a_template_expands_to_count_clients_in_place_with_their_values(before, count, after, seed, batch):
    """For any count and position among hand-written clients: count clients in the
    template's place, ids and shards formatted with k, each-values in order, a seeded
    choice that is the same on every expansion and within its options."""
    from collafuse_hpc.client_templates import expand

    hand = [{"id": f"h{i}", "shard": "x.h5"} for i in range(before + after)]
    template = {
        "count": count,
        "id": "c{k}",
        "shard": "data/client_{k:03d}.h5",
        "cut_ratio": {"choice": [0.2, 0.5, 0.8], "seed": seed},
        "batch_size": {"each": [batch[0] + k for k in range(count)]},
        "model": {"base_channels": 16},
    }
    raw = {"clients": [*hand[:before], {"template": template}, *hand[before:]]}
    clients = expand(raw)["clients"]
    assert len(clients) == before + count + after
    assert clients[:before] == hand[:before] and clients[before + count :] == hand[before:]
    made = clients[before : before + count]
    assert [c["id"] for c in made] == [f"c{k}" for k in range(count)]
    assert [c["shard"] for c in made] == [f"data/client_{k:03d}.h5" for k in range(count)]
    assert [c["batch_size"] for c in made] == [batch[0] + k for k in range(count)]
    assert all(c["cut_ratio"] in (0.2, 0.5, 0.8) and c["model"] == {"base_channels": 16} for c in made)
    assert [c["cut_ratio"] for c in expand(raw)["clients"][before : before + count]] == [c["cut_ratio"] for c in made]
    assert raw["clients"][before] == {"template": template}  # the input is not changed


def test_every_range_of_the_reference_is_enforced(tmp_path, shards):
    """For each rule of config_rules.RANGES, a value just outside it is refused by name:
    the reference cannot list a bound that validate does not check."""
    from collafuse_hpc.config_rules import RANGES

    base = write_config(tmp_path / "run.yaml", tiny_config(shards, tmp_path, [0.5, 0.5]))
    for pattern, rng in RANGES.items():
        key = pattern.replace("*.model", "server.model").replace("clients.*", "clients.0").replace(".*", ".0")
        bad = rng.lo if rng.lo_open else rng.lo - 1
        assert bad != 0 or not rng.or_zero, f"{key}: pick a refused value below {rng.lo}"
        with pytest.raises(ValueError, match=re.escape(f"'{key}' must be {rng.describe({'diffusion.timesteps': 20})}")):
            load(base, [f"{key}={bad}"])
        if rng.or_zero:  # 0 turns it off (eval.bootstrap: 0, no intervals)
            load(base, [f"{key}=0"])


def test_an_override_of_one_client_leaves_clients_sharing_a_yaml_anchor_alone(tmp_path):
    """``model: *small`` loads as one object for every client that names the anchor: a
    --set of one client's model must not change the others'."""
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "clients:\n"
        "  - {id: a, shard: a.h5, cut_ratio: 0.5, model: &small {base_channels: 8, channel_mult: [1]}}\n"
        "  - {id: b, shard: b.h5, cut_ratio: 0.5, model: *small}\n"
    )
    cfg = load(str(path), ["clients.1.model.base_channels=4"], check_files=False)
    assert [c.model.base_channels for c in cfg.clients] == [8, 4]
