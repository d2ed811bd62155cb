import dataclasses
import math
import threading
import tomllib
import typing

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herdsman.config import ConfigError, HerdsmanConfig, from_dict, load_config, to_toml
from tests.bounds import bounded


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


# --- values out of range: one line naming the key ------------------------------------------------------------

def test_the_model_context_table_matches_the_trainers_sizes():
    from herdsman.config import MODEL_CONTEXT
    from trainer.model import SIZES

    assert MODEL_CONTEXT == {name: args.max_seq_len for name, args in SIZES.items()}


BAD = [
    ("[trainer]\nseq_len = 1024\n", "trainer.seq_len = 1024 is beyond the context of model 'tiny' (512)"),
    ("[trainer]\nmodel = \"small\"\nseq_len = 1024\n", "trainer.seq_len = 1024 is beyond the context of model 'small'"),
    ("[trainer]\nmodel = \"8B\"\nseq_len = 8193\n", "trainer.seq_len = 8193 is beyond the context of model '8B'"),
    ("[trainer]\nseq_len = 0\n", "trainer.seq_len = 0 must be >= 1"),
    ("[trainer]\nlr = -1\n", "trainer.lr = -1.0 must be > 0"),
    ("[trainer]\nlr = 0\n", "trainer.lr = 0.0 must be > 0"),
    ("[trainer]\nmodel = \"huge\"\n", "trainer.model = 'huge' must be one of"),
    ("[trainer]\nbatch_size = 0\n", "trainer.batch_size = 0 must be >= 1"),
    ("[trainer]\nwarmup_steps = -1\n", "trainer.warmup_steps = -1 must be >= 0"),
    ("[trainer]\nkeep_checkpoints = 0\n", "trainer.keep_checkpoints = 0 must be >= 1"),
    ("[trainer]\nfr_buffer_size = -1\n", "trainer.fr_buffer_size = -1 must be >= 0"),
    ("[trainer]\ncollective_timeout_s = 0\n", "trainer.collective_timeout_s = 0.0 must be > 0"),
    ("[trainer]\nstep_delay_s = -0.5\n", "trainer.step_delay_s = -0.5 must be >= 0"),
    ("[trainer]\nseed = -1\n", "trainer.seed = -1 must be >= 0"),
    ("[trainer]\nmemory_dir = \"/dev/shm/{user}\"\n", "trainer.memory_dir = '/dev/shm/{user}' may use only"),
    ("[trainer]\nmemory_dir = \"{job:999999999}\"\n", "trainer.memory_dir"),
    ("[api]\nport = 65536\n", "api.port = 65536 must be in [0, 65535]"),
    ("[api]\nport = -1\n", "api.port = -1 must be in [0, 65535]"),
    ("[agent]\nmetrics_port = 70000\n", "agent.metrics_port = 70000 must be in [0, 65535]"),
    ("[api]\ntoken = \"x\"\n", "api.token must be empty (a random one is generated) or at least 16"),
    ("[api]\ntoken = \"0123456789abcde \"\n", "api.token must be empty"),
    ('job = "../x"\n', "job = '../x' is not a valid job name"),
    ('job = "a/b"\n', "job = 'a/b' is not a valid job name"),
    ('job = ""\n', "job = '' is not a valid job name"),
    ('job = ".."\n', "job = '..' is not a valid job name"),
    ('job = "-rf"\n', "job = '-rf' is not a valid job name"),
    ('job = "a b"\n', "job = 'a b' is not a valid job name"),
    ('job = "ok\\n"\n', "is not a valid job name"),
    ('job = "' + "j" * 65 + '"\n', "is not a valid job name"),
    ('run_dir = ""\n', "run_dir must not be empty"),
    ('run_dir = "a\\u0000b"\n', "run_dir must not contain a NUL character"),
    ("[agent]\ninterval_s = inf\n", "agent.interval_s = inf must be a finite number"),
    ("[agent]\ninterval_s = nan\n", "agent.interval_s = nan must be a finite number"),
    ("[trainer]\nlr = nan\n", "trainer.lr = nan must be a finite number"),
    ("[simulate]\ndays = inf\n", "simulate.days = inf must be a finite number"),
    ("[simulate]\nfailure_scale = -inf\n", "simulate.failure_scale = -inf must be a finite number"),
    ("[controller]\nlemon_threshold = 0\n", "controller.lemon_threshold = 0 must be >= 1"),
    ("[controller]\nrestart_backoff_s = -1\n", "controller.restart_backoff_s = -1.0 must be >= 0"),
    ("[controller]\nfailure_grace_s = -1\n", "controller.failure_grace_s = -1.0 must be >= 0"),
    ("[controller]\ndrain_timeout_s = -5\n", "controller.drain_timeout_s = -5.0 must be >= 0"),
    ("[controller]\ndump_wait_s = -1\n", "controller.dump_wait_s = -1.0 must be >= 0"),
    ("[controller]\nhang_timeout_s = 0\n", "controller.hang_timeout_s = 0.0 must be > 0"),
    ("[controller]\nheartbeat_timeout_s = 0\n", "controller.heartbeat_timeout_s = 0.0 must be > 0"),
    ("[controller]\nstartup_timeout_s = 0\n", "controller.startup_timeout_s = 0.0 must be > 0"),
    ("[controller]\nevidence_window_s = 0\n", "controller.evidence_window_s = 0.0 must be > 0"),
    ("[controller]\nlemon_window_s = 0\n", "controller.lemon_window_s = 0.0 must be > 0"),
    ("[controller]\ncontroller_restarts = -2\n", "controller.controller_restarts = -2 must be >= -1"),
    ("[controller]\nheartbeat_timeout_s = 0.4\n",
     "controller.heartbeat_timeout_s = 0.4 must be longer than agent.interval_s (0.5)"),
    ("[agent]\nmin_disk_free_ratio = 1\n", "agent.min_disk_free_ratio = 1.0 must be in [0, 1)"),
    ("[agent]\nmin_disk_free_ratio = -0.1\n", "agent.min_disk_free_ratio = -0.1 must be in [0, 1)"),
    ("[agent]\ndrift_window = 0\n", "agent.drift_window = 0 must be >= 1"),
    ("[cluster]\ncpus_per_host = 0\n", "cluster.cpus_per_host = 0 must be >= 1"),
    ("[cluster]\naddress = \"\"\n", "cluster.address must not be empty"),
    ("[simulate]\nplanned_per_day = -1\n", "simulate.planned_per_day = -1.0 must be >= 0"),
    ("[simulate]\nlemon_window_s = 0\n", "simulate.lemon_window_s = 0.0 must be > 0"),
    ("[simulate]\nrestart_budget = -1\n", "simulate.restart_budget = -1 must be >= 0"),
    ("[simulate]\ndays = 1e400\n", "simulate.days = inf must be a finite number"),
    ("[simulate]\ndays = " + "9" * 400 + "\n", "simulate.days = <1329-bit integer> is too large for a float"),
    ("[trainer]\nsteps = " + "9" * 30 + "\n", "trainer.steps = <100-bit integer> does not fit in 64 bits"),
    ("[store]\nurl = \"herdsman.db\"\n", "store.url = 'herdsman.db' is not an SQLAlchemy URL"),
    # huge finite durations: Event.wait(1e10) raises OverflowError (beyond threading.TIMEOUT_MAX)
    ("[controller]\npoll_interval_s = 1e10\n", "controller.poll_interval_s = 10000000000.0 must be <= 1e+07 s"),
    ("[agent]\ninterval_s = 1e10\n", "agent.interval_s = 10000000000.0 must be <= 1e+07 s"),
    ("[trainer]\nstep_delay_s = 1e308\n", "trainer.step_delay_s = 1e+308 must be <= 1e+07 s"),
]


@pytest.mark.parametrize("text, message", BAD, ids=[m[:48] for _, m in BAD])
def test_a_value_out_of_range_is_one_line_naming_the_key(tmp_path, text, message):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert message in str(e.value) and "\n" not in str(e.value)


GOOD_EDGES = [
    {"trainer": {"seq_len": 512}}, {"trainer": {"model": "8B", "seq_len": 8192}}, {"trainer": {"seq_len": 1}},
    {"api": {"port": 65535, "token": "0123456789abcdef"}}, {"agent": {"metrics_port": 0, "min_disk_free_ratio": 0}},
    {"controller": {"lemon_threshold": 1, "failure_grace_s": 0, "restart_backoff_s": 0, "drain_timeout_s": 0,
                    "dump_wait_s": 0, "controller_restarts": -1, "max_restarts": 0}},
    {"trainer": {"warmup_steps": 0, "fr_buffer_size": 0, "step_delay_s": 0, "sdc_check_every": 0, "seed": 0,
                 "memory_dir": "/dev/shm/{{x}}/{job}/{host}-{run_dir}"}},
    {"job": "a"}, {"job": "Llama3_405B.run-2"}, {"job": "j" * 64},
    {"store": {"url": "postgresql+psycopg://u:pw@db:5432/herdsman"}},
    {"simulate": {"restore_memory_s": 0, "human_response_s": 0, "failure_scale": 0}},
    {"controller": {"lemon_window_s": 1e7, "drain_timeout_s": 1e7}, "simulate": {"lemon_repair_s": 1e7}},
]


@pytest.mark.parametrize("overrides", GOOD_EDGES)
def test_values_at_the_edge_of_their_range_are_accepted(overrides):
    load_config(overrides=overrides)


def test_replace_and_direct_construction_are_checked_too():
    from dataclasses import replace

    from herdsman.config import ApiConfig, ControllerConfig, SimulateConfig

    with pytest.raises(ConfigError, match=r"simulate\.days = inf must be a finite number"):
        replace(SimulateConfig(), days=float("inf"))
    with pytest.raises(ConfigError, match=r"controller\.hang_timeout_s = 0 must be > 0"):
        ControllerConfig(hang_timeout_s=0)
    with pytest.raises(ConfigError, match="must be str"):
        ApiConfig(port=1, token=None)


def test_secrets_are_not_echoed_in_errors():
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"api": {"token": "hunter2"}})
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"api": {"token": 12345678901234567890}})
    assert "12345678901234567890" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"store": {"url": "admin:hunter2@db/herdsman"}})
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(overrides={"store": {"url": 3}})
    assert "store.url" in str(e.value)


# --- files that are not TOML text ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content, message", [
    (b"job = \"caf\xe9\"\n", r"is not UTF-8 text \(byte 0xe9 at offset 10\)"),
    (b"\xff\xfe[\x00t\x00", "is not UTF-8 text"),
    (b"a = " + b"[" * 5000 + b"]" * 5000 + b"\n", "not valid TOML"),
    (b"[trainer]\nsteps = 1" + b"0" * 5000 + b"\n", "not valid TOML"),
])
def test_a_file_that_is_not_toml_text_is_one_clear_error(tmp_path, content, message):
    p = tmp_path / "bad.toml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(p)
    assert "\n" not in str(e.value)


def test_a_bom_is_allowed(tmp_path):
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbfjob = \"x\"\n")
    assert load_config(p).job == "x"


def test_a_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


# --- to_toml: every string survives, secrets are left out ------------------------------------------------------------

def test_strings_with_control_characters_round_trip():
    c = load_config(overrides={"agent": {"kernel_log": "a\tb\nc\x01\x7f\"\\é😀"}, "run_dir": "r\x1b[0m"})
    assert from_dict(tomllib.loads(to_toml(c))) == c


def test_to_toml_leaves_secrets_out_unless_asked():
    token, url = "t0ken-" + "x" * 20, "postgresql+psycopg://herdsman:hunter2@db:5432/herdsman"
    c = load_config(overrides={"api": {"token": token}, "store": {"url": url}})
    text = to_toml(c)
    assert token not in text and "hunter2" not in text
    assert text.startswith("# secrets left out: api.token, the password in store.url\n")
    back = from_dict(tomllib.loads(text))
    assert back.api.token == "" and back.store.url == "postgresql+psycopg://herdsman:***@db:5432/herdsman"
    assert back.trainer == c.trainer and back.job == c.job and back.run_dir == c.run_dir
    assert from_dict(tomllib.loads(to_toml(c, redact=False))) == c
    assert not to_toml(load_config()).startswith("#")  # nothing to leave out: no comment


# --- fuzzing: any file gives a HerdsmanConfig or a ConfigError, never another exception ------------------------------

_HINTS = typing.get_type_hints(HerdsmanConfig)
SECTIONS = {name: [f.name for f in dataclasses.fields(t)] for name, t in _HINTS.items() if dataclasses.is_dataclass(t)}
TOP_KEYS = [name for name, t in _HINTS.items() if not dataclasses.is_dataclass(t)]
_ESC = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def toml_string(s: str) -> str:
    return '"' + "".join(_ESC.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                         for c in s) + '"'


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


nasty_strings = st.one_of(
    st.sampled_from(["", "local", "tiny", "small", "8B", "405B", "nvml", "simulated", "../etc", "a/../../b", "/",
                     "..", ".", "{job}", "{nope}", "{job:999}", "{", "sqlite:///x.db", "postgresql://u:p@h/d",
                     "u:p@h", "x" * 70, "a\x00b", "é😀", "  ", "-x", "llama3-demo"]),
    st.text(max_size=40))
scalars = st.one_of(
    st.integers(-3, 70000), st.integers(), st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**63, -(2**63) - 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-300, 1e308, 0.5, 1.0]),
    st.booleans(), nasty_strings)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


FIELD_TYPES = {(name, f.name): typing.get_type_hints(t)[f.name]
               for name, t in _HINTS.items() if dataclasses.is_dataclass(t) for f in dataclasses.fields(t)}
FIELD_TYPES.update({("", k): _HINTS[k] for k in TOP_KEYS})

DURATIONS = sorted((section, name) for (section, name), typ in FIELD_TYPES.items()
                   if typ is float and name.endswith("_s"))


@pytest.mark.parametrize("section, name", DURATIONS, ids=[f"{s}.{n}" for s, n in DURATIONS])
def test_every_duration_has_an_upper_bound(section, name):
    with pytest.raises(ConfigError) as e:
        load_config(overrides={section: {name: 1e10}})
    assert str(e.value) == f"{section}.{name} = 10000000000.0 must be <= 1e+07 s (about 115 days)"


TYPED = {int: st.one_of(st.integers(-2, 70000), st.integers()), bool: st.booleans(), str: nasty_strings,
         float: st.one_of(st.floats(-1, 1e6), st.floats(allow_nan=True, allow_infinity=True))}


RARELY = st.sampled_from([False] * 15 + [True])


@st.composite
def key_values(draw, section: str, known: list[str]) -> list[str]:
    """Mostly real keys with values of their type (near and beyond the edges), sometimes anything at all."""
    lines = []
    for key in draw(st.lists(st.sampled_from(known), max_size=5, unique=True)):
        if draw(RARELY):  # a key that is not there
            key = draw(st.text(max_size=6))
        typ = FIELD_TYPES.get((section, key))
        value = draw(TYPED[typ] if typ in TYPED and draw(st.integers(0, 3)) else values)
        lines.append(f"{toml_string(key)} = {toml_value(value)}")
    return lines


@st.composite
def config_documents(draw) -> str:
    lines = draw(key_values("", TOP_KEYS))
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=4, unique=True)):
        if draw(RARELY):  # a section that is not there
            section = draw(st.text(min_size=1, max_size=6))
        lines.append(f"[{toml_string(section)}]")
        lines += draw(key_values(section, SECTIONS.get(section, ["x"])))
    text = "\n".join(lines) + "\n"
    # and sometimes a mutilation: a random cut or a splice of random text (raw bytes: the next test)
    how = draw(st.sampled_from(["keep", "keep", "keep", "keep", "cut", "splice"]))
    if how == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=12)) + text[at:]
    return text


def load_or_config_error(path):
    try:
        with bounded("config file", seconds=1.0, mib=16):
            cfg = load_config(path)
    except ConfigError as e:
        assert "\n" not in str(e), str(e)
        return None
    assert isinstance(cfg, HerdsmanConfig)
    return cfg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(doc=config_documents())
def test_any_toml_document_loads_or_is_a_config_error(tmp_path, doc):
    p = tmp_path / "fuzz.toml"
    p.write_text(doc, encoding="utf-8")
    cfg = load_or_config_error(p)
    if cfg is not None:  # every duration it loads can be waited for; written back, it loads the same
        for section, name in DURATIONS:
            assert 0 <= getattr(getattr(cfg, section), name) <= threading.TIMEOUT_MAX
        p.write_text(to_toml(cfg, redact=False), encoding="utf-8")
        assert load_config(p) == cfg


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_any_bytes_load_or_are_a_config_error(tmp_path, data):
    p = tmp_path / "fuzz.toml"
    p.write_bytes(data)
    load_or_config_error(p)


def test_the_control_loop_survives_a_poll_interval_beyond_what_a_wait_takes(tmp_path):
    """Defence in depth behind the bound: a configuration built around the checks (object.__setattr__ on the frozen
    section) must not end the control thread with OverflowError in Event.wait."""
    from orchestrator.controller import Controller
    from orchestrator.store import Store
    from tests.test_controller import Clock, FakeFleet

    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "job": "unit"})
    object.__setattr__(cfg.controller, "poll_interval_s", 1e10)
    clock = Clock()
    store = Store(f"sqlite:///{tmp_path / 'h.db'}")
    ctrl = Controller(cfg, store=store, fleet=FakeFleet(clock), clock=clock)
    try:
        ctrl.start()
        for _ in range(40):  # the loop reaches a waiting state at once (no agent has reported yet)
            if not ctrl._thread.is_alive():
                break
            threading.Event().wait(0.01)
        assert ctrl._thread.is_alive(), "the control thread died"
    finally:
        ctrl._stop.set()
        ctrl._wake.set()
        ctrl._thread.join(timeout=10)
        ctrl.records.close(timeout_s=1)
        store.close()
    assert not ctrl._thread.is_alive()
