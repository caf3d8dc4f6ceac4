"""Config loading: types, unknown keys, ranges, files, overrides, roles."""

from pathlib import Path

import pytest
from conftest import tiny_config, write_config

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
    assert topo.is_server(0) and topo.client_index(2) == 1 and topo.server_of(1) == 0
    assert topo.describe(1) == "rank 1 (client 'c0')"
    with pytest.raises(ValueError, match=r"world size 4 does not match.*mpirun -np 3"):
        Topology.from_config(cfg, 4)


@pytest.mark.parametrize("name", ["quickstart", "study_digits", "celeba64", "cub64"])
def test_shipped_configs_are_valid(name):
    cfg = load(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"), check_files=False)
    assert Topology.from_config(cfg).world_size == 1 + len(cfg.clients)


def test_star_override_sets_every_client(cfg_file):
    cfg = load(cfg_file(), ["clients.*.cut_ratio=0.6", "clients.*.batch_size=3"])
    assert [c.cut_ratio for c in cfg.clients] == [0.6, 0.6] and [c.batch_size for c in cfg.clients] == [3, 3]
