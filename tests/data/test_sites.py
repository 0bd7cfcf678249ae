"""A site's own data file makes the same client as the partition it came from."""

import pytest

from fedmole.config import load_config
from fedmole.data.sites import export_sites, node_site, site_client
from fedmole.data.sources import DataError
from fedmole.engine.setup import build_client_data

CFG = ["data.num_clients=3", "fed.tiers=[4,2,1]", "data.max_test=4"]


def test_site_files_rebuild_exactly_the_clients_of_the_partition(tmp_path):
    cfg = load_config("configs/tiny.toml", CFG)
    files = export_sites(cfg, tmp_path)
    assert [f.relative_to(tmp_path).as_posix() for f in files] == [f"site_{i}/data.jsonl" for i in range(3)]
    for expected, path in zip(build_client_data(cfg), files):
        got = site_client(cfg, expected.client_id, path)
        assert (got.name, got.train, got.aux, got.val, got.test) == \
            (expected.name, expected.train, expected.aux, expected.val, expected.test)
    other_seed = site_client(cfg, 0, files[0], split_seed=7)
    assert other_seed.train != build_client_data(cfg)[0].train


def test_node_config_names_the_file_its_format_and_seed(tmp_path):
    cfg = load_config("configs/tiny.toml", CFG)
    files = export_sites(cfg, tmp_path)
    renamed = files[1].with_suffix(".txt")
    files[1].rename(renamed)
    site = node_site(cfg, {"data-path": str(renamed), "data-format": "jsonl", "split-seed": "0", "name": "x"}, 1)
    assert site.name == "x" and site.train == build_client_data(cfg)[1].train
    assert node_site(cfg, {"partition-id": 1}, 1) is None  # no site data: the config's [data] applies
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        node_site(cfg, {"data-path": str(renamed)}, 1)
    with pytest.raises(DataError, match="unknown node config key 'data-fromat'"):
        node_site(cfg, {"data-path": str(renamed), "data-fromat": "jsonl"}, 1)
