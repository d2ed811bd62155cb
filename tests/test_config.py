import tomllib

import pytest

from herdsman.config import ConfigError, HerdsmanConfig, from_dict, load_config, to_toml


def test_defaults_run_on_a_laptop():
    c = load_config()
    assert c == HerdsmanConfig()
    assert c.cluster.address == "local" and c.agent.gpu_backend == "simulated" and c.trainer.model == "tiny"
    assert c.store_url.startswith("sqlite:///")


def test_toml_file_overrides_and_round_trips(tmp_path):
    p = tmp_path / "h.toml"
    p.write_text('job = "x"\n[trainer]\nsteps = 7\nlr = 1\n[store]\nurl = "sqlite:///a.db"\n')
    c = load_config(p)
    assert (c.job, c.trainer.steps, c.trainer.lr, c.store_url) == ("x", 7, 1.0, "sqlite:///a.db")
    assert from_dict(tomllib.loads(to_toml(c))) == c


@pytest.mark.parametrize("text, message", [
    ("[trainer]\nstepz = 3\n", "unknown config key 'trainer.stepz'"),
    ("[nope]\na = 1\n", "unknown config key 'nope'"),
    ("[trainer]\nsteps = \"many\"\n", "must be int"),
    ("[trainer]\nsteps = true\n", "must be int"),
    ("[agent]\ngpu_backend = \"cuda\"\n", "gpu_backend"),
    ("trainer = 3\n", "must be a table"),
    ("[trainer\n", "not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
