"""The config tree is strict: every shipped YAML loads; bad keys, types and values name file and key."""
from pathlib import Path

import pytest

from pipeline.config import RunConfig, dump_config, load_config
from pipeline.configtree import build, to_plain
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in SHIPPED} >= {"demo.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    again = build(RunConfig, to_plain(cfg), source="round trip")
    assert again == cfg
    assert dump_config(cfg)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "name: t\ndata:\n  inputs: [{path: x.tsv, format: cc3m}]\n"


@pytest.mark.parametrize("extra, message", [
    ("download:\n  timout: 3\n", "unknown key 'download.timout'"),
    ("download:\n  timeout: fast\n", "download.timeout: expected a number, got 'fast'"),
    ("download:\n  timeout: 0\n", "download.timeout: must be > 0"),
    ("download:\n  resize_mode: stretch\n", "download.resize_mode: 'stretch' is not one of"),
    ("prefilter:\n  boilerplate_patterns: ['(unclosed']\n", "prefilter.boilerplate_patterns[0]: not a valid regex"),
    ("prefilter:\n  dedup_near: 'yes'\n", "prefilter.dedup_near: expected true or false"),
    ("stages: [download, prefilter, download]\n", "stages: a stage is listed twice"),
    ("stages: [download, dedupe]\n", "stages[1]: 'dedupe' is not one of 'download'"),
    ("bogus: 1\n", "unknown key 'bogus'"),
])
def test_bad_values_name_file_and_key(tmp_path, extra, message):
    path = _write(tmp_path, BASE + extra)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_stages_run_in_the_graphs_order_whatever_the_lists(tmp_path):
    cfg = load_config(_write(tmp_path, BASE + "stages: [report, prefilter, download]\n"))
    assert cfg.stages == ("download", "prefilter", "report")
    assert "stages:\n- download\n- prefilter\n- report\n" in dump_config(cfg)


def test_toyweb_rates_are_checked(tmp_path):
    path = _write(tmp_path, "name: t\ndata:\n  toyweb:\n    noise: {mismatched: 0.7, boilerplate: 0.5}\n")
    with pytest.raises(ConfigError, match=r"data.toyweb.noise: caption noise rates add up to 1.35 > 1"):
        load_config(path)


def test_missing_inputs_and_required_keys(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'name'"):
        load_config(_write(tmp_path, "data: {toyweb: {}}\n"))
    with pytest.raises(ConfigError, match="data.inputs: give at least one URL list"):
        load_config(_write(tmp_path, "name: t\ndata: {}\n"))


def test_overrides(tmp_path):
    path = _write(tmp_path, BASE)
    cfg = load_config(path, ["download.timeout=4", "prefilter.dedup_near=false", "data.inputs[0]=x"][:2])
    assert cfg.download.timeout == 4.0 and cfg.prefilter.dedup_near is False
    # relative list paths resolve against the config file
    assert cfg.data.inputs[0].path == str((tmp_path / "x.tsv").resolve())
    with pytest.raises(ConfigError, match=r"with --set download.thread_count=many.*download.thread_count: expected an integer"):
        load_config(path, ["download.thread_count=many"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(path, ["download.timeout"])
    with pytest.raises(ConfigError, match="unknown key 'download.nope'"):
        load_config(path, ["download.nope=1"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "name: [unclosed\n"))


def test_config_is_frozen():
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    with pytest.raises(Exception):
        cfg.download.timeout = 1  # type: ignore[misc]


def test_vlp_plan_accepts_the_laion400m_config_without_its_lists():
    """configs/laion400m.yaml is checked from a machine that does not mount LAION's lists: the plan has
    every stage and its request, with the counts unknown."""
    from pipeline.plan import format_plan, missing_lists, plan

    cfg = load_config(ROOT / "configs" / "laion400m.yaml")
    steps = plan(cfg)
    assert [s.stage for s in steps][:3] == ["download", "prefilter", "pretrain"]
    assert len(missing_lists(cfg)) == len(cfg.data.inputs) == 32
    assert "32 x {CPU 1, GPU 1} together" in format_plan(cfg, steps)
