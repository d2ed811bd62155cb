"""Secrets stay out of files, messages and logs: herdsman/secrets.py and the `herdsman` CLI."""

import contextlib
import io
import logging
import os
import stat
import sys
import tomllib

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from herdsman import HerdsmanError
from herdsman.config import from_dict, load_config, to_toml
from herdsman.secrets import (
    RedactingFilter,
    install_log_redaction,
    redact_text,
    redact_url,
    write_private,
)

# --- redact_url / redact_text ------------------------------------------------------------------------------------

URLS = [
    ("postgresql+psycopg://user:pw@host/db", "postgresql+psycopg://user:***@host/db"),
    ("postgresql+psycopg://herdsman:s3cr%40t@db.internal:5432/herdsman?sslmode=require",
     "postgresql+psycopg://herdsman:***@db.internal:5432/herdsman?sslmode=require"),
    ("postgresql://u:p@ss@host:5432/db", "postgresql://u:***@host:5432/db"),  # an unescaped '@': all hidden
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("mysql://u:pw@[::1]:3306/d", "mysql://u:***@[::1]:3306/d"),
    ("http://admin:admin@grafana:3000", "http://admin:***@grafana:3000"),
    ("user:pw@host/db", "user:***@host/db"),  # no scheme: still a credential
    ("host=db user=u password=hunter2 dbname=h", "host=db user=u password=*** dbname=h"),
    ("https://h/api?token=abc123&x=1", "https://h/api?token=***&x=1"),
    # nothing to hide
    ("postgresql+psycopg://user@host/db", "postgresql+psycopg://user@host/db"),
    ("postgresql://host:5432/db", "postgresql://host:5432/db"),
    ("sqlite:////tmp/run@1/herdsman.db", "sqlite:////tmp/run@1/herdsman.db"),
    ("sqlite:///herdsman-run/herdsman.db", "sqlite:///herdsman-run/herdsman.db"),
    ("postgresql://u:@h/db", "postgresql://u:@h/db"),
    ("", ""), ("garbage", "garbage"), ("://:@", "://:@"), ("a:b", "a:b"), ("%%%:::@@@", "%%%:***@"),
]


@pytest.mark.parametrize("url, expected", URLS)
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_redact_text_hides_urls_inside_text_and_literal_secrets():
    token = "Zm9vYmFyYmF6cXV4cXV1eA"
    text = (f"cannot open the store at 'postgresql+psycopg://h:hunter2@db/x': refused; also tried "
            f"(mysql://root:toor@m/y), token {token} rejected\nnext line http://a:b@c/")
    out = redact_text(text, [token, ""])
    for secret in ("hunter2", "toor", token, ":b@"):
        assert secret not in out
    assert out == ("cannot open the store at 'postgresql+psycopg://h:***@db/x': refused; also tried "
                   "(mysql://root:***@m/y), token *** rejected\nnext line http://a:***@c/")
    assert redact_text("ratio 3:2 at 5@6, see http://host:8080/x and sqlite:///a.db") == \
        "ratio 3:2 at 5@6, see http://host:8080/x and sqlite:///a.db"


@settings(max_examples=200, deadline=None)
@given(scheme=st.sampled_from(["postgresql+psycopg", "postgresql", "mysql+pymysql", "redis", "https"]),
       user=st.text(st.characters(categories=["L", "N"], include_characters="-_.%"), max_size=8),
       password=st.text(st.characters(blacklist_categories=["Z", "C"], blacklist_characters="'\"<>"), min_size=1,
                        max_size=24),
       host=st.sampled_from(["db", "10.0.0.1:5432", "[::1]", "db.example.org"]),
       path=st.sampled_from(["", "/herdsman", "/h?sslmode=require", "/d@x"]))
def test_a_url_password_never_survives(scheme, user, password, host, path):
    url = f"{scheme}://{user}:{password}@{host}{path}"
    out = redact_url(url)
    # everything up to the last '@' goes (an '@' in the path hides the host too: too much, never too little)
    assert out == f"{scheme}://{user}:***@{f'{password}@{host}{path}'.rsplit('@', 1)[1]}"
    assert redact_text(f"error at {url}: refused") == f"error at {out}: refused"


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_redaction_of_any_text_does_not_raise_and_is_idempotent(text):
    once = redact_text(text, ["secret-token"])
    assert redact_text(once, ["secret-token"]) == once
    assert "secret-token" not in once


# --- write_private -----------------------------------------------------------------------------------------------------

def test_write_private_creates_and_replaces_with_mode_0600(tmp_path, monkeypatch):
    target = tmp_path / "herdsman.resolved.toml"
    target.write_text("old")
    target.chmod(0o644)
    opened = []
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *a, **kw):
        opened.append((str(path), flags, mode))
        return real_open(path, flags, mode, *a, **kw)

    monkeypatch.setattr(os, "open", spy_open)
    old_umask = os.umask(0)  # the most permissive umask: the mode must come from the code
    try:
        write_private(target, "token = \"x\"\n")
    finally:
        os.umask(old_umask)
    assert target.read_text() == "token = \"x\"\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    (tmp, flags, mode), *_ = opened
    assert tmp != str(target) and os.path.dirname(tmp) == str(tmp_path)  # a new file, renamed over the target
    assert flags & os.O_CREAT and flags & os.O_EXCL and mode == 0o600  # private from its creation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["herdsman.resolved.toml"]  # no temporary left


def test_write_private_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "f"
    target.write_text("old")

    def fail(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_private(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_the_resolved_config_can_be_written_without_secrets(tmp_path):
    cfg = load_config(overrides={"api": {"token": "a-long-operator-token"},
                                 "store": {"url": "postgresql+psycopg://h:hunter2@db/h"}})
    path = tmp_path / "herdsman.resolved.toml"
    write_private(path, to_toml(cfg))
    text = path.read_text()
    assert "hunter2" not in text and "a-long-operator-token" not in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert from_dict(tomllib.loads(text)).trainer == cfg.trainer  # what the trainer reads is all there


# --- logging -----------------------------------------------------------------------------------------------------------

def test_the_logging_filter_hides_passwords_in_messages_arguments_and_tracebacks():
    logger = logging.getLogger("herdsman.test.redaction")
    logger.propagate = False
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger.addHandler(handler)
    try:
        flt = install_log_redaction(logger)
        assert install_log_redaction(logger) is flt and handler.filters.count(flt) == 1  # idempotent
        flt.add_secret("literal-token-123")
        logger.warning("store %s unreachable", "postgresql://u:hunter2@db/h")
        logger.warning("token literal-token-123 refused")
        try:
            raise RuntimeError("cannot connect to mysql://root:toor@m/y")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "hunter2" not in text and "toor" not in text and "literal-token-123" not in text
    assert "postgresql://u:***@db/h" in text and "mysql://root:***@m/y" in text and "Traceback" in text


def test_the_filter_leaves_other_records_alone():
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "step %d of %s", (3, "job"), None)
    assert RedactingFilter().filter(rec) and rec.getMessage() == "step 3 of job" and rec.args == (3, "job")


# --- the CLI -----------------------------------------------------------------------------------------------------------

TOKEN = "operator-token-0123456789"
URL = "postgresql+psycopg://herdsman:hunter2@127.0.0.1:1/herdsman"


@pytest.fixture
def secret_config(tmp_path):
    p = tmp_path / "h.toml"
    p.write_text(f'run_dir = "{tmp_path}"\n[api]\ntoken = "{TOKEN}"\n[store]\nurl = "{URL}"\n')
    return p


def test_herdsman_config_leaves_secrets_out_unless_asked(secret_config):
    from orchestrator.cli import main

    r = CliRunner().invoke(main, ["config", "--config", str(secret_config)])
    assert r.exit_code == 0, r.output
    assert TOKEN not in r.output and "hunter2" not in r.output and "herdsman:***@127.0.0.1" in r.output
    r = CliRunner().invoke(main, ["config", "--config", str(secret_config), "--show-secrets"])
    assert r.exit_code == 0 and TOKEN in r.output and URL in r.output


def test_an_operator_error_never_shows_a_password_or_the_token(secret_config, monkeypatch):
    import orchestrator.store
    from orchestrator.cli import main

    class Unreachable:
        def __init__(self, url):
            raise HerdsmanError(f"cannot open the store at {url} (token {TOKEN})")

    monkeypatch.setattr(orchestrator.store, "Store", Unreachable)
    r = CliRunner().invoke(main, ["report", "--config", str(secret_config)])
    assert r.exit_code == 2 and "herdsman: error: cannot open the store at" in r.output
    assert "hunter2" not in r.output and TOKEN not in r.output and "herdsman:***@127.0.0.1:1" in r.output
    r = CliRunner().invoke(main, ["report", "--db", "postgresql://u:pw-on-the-command-line@h/db"])
    assert r.exit_code == 2 and "pw-on-the-command-line" not in r.output


def test_a_bugs_traceback_never_shows_a_password(monkeypatch):
    import orchestrator.cli
    from orchestrator.cli import main

    def boom(*a, **kw):
        raise RuntimeError(f"unexpected: {URL}")

    monkeypatch.setattr(orchestrator.cli, "load_config", boom)
    r = CliRunner().invoke(main, ["config"])
    assert r.exit_code == 1 and "Traceback" in r.output and "RuntimeError: unexpected" in r.output
    assert "hunter2" not in r.output


def test_the_cli_installs_the_logging_filter(secret_config, monkeypatch, caplog):
    import orchestrator.cli
    from orchestrator.cli import main

    real = orchestrator.cli.load_config

    def logs_then_loads(*a, **kw):
        logging.getLogger("herdsman.some.module").warning("retrying %s", URL)
        return real(*a, **kw)

    monkeypatch.setattr(orchestrator.cli, "load_config", logs_then_loads)
    assert CliRunner().invoke(main, ["config", "--config", str(secret_config)]).exit_code == 0
    assert "retrying postgresql+psycopg://herdsman:***@127.0.0.1:1/herdsman" in caplog.text
    assert "hunter2" not in caplog.text


def test_cli_errors_from_a_subprocess_hide_the_password(secret_config):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "report", "--config", str(secret_config)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and "hunter2" not in r.stderr + r.stdout and TOKEN not in r.stderr + r.stdout


# --- the controller's and the agents' processes --------------------------------------------------------------------

def test_a_process_without_logging_configured_gets_its_logs_redacted():
    """A Ray actor's root logger has no handler (records go to logging.lastResort, which no filter reaches)."""
    import subprocess

    code = ("import logging\nfrom herdsman.secrets import protect_process_logs\n"
            "assert not logging.getLogger().handlers\n"
            f"protect_process_logs([{TOKEN!r}])\n"
            f"logging.getLogger('herdsman.x').warning('store %s token %s', {URL!r}, {TOKEN!r})\n"
            "logging.getLogger('herdsman.x').info('not shown: lastResort is WARNING too')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "WARNING herdsman.x: store postgresql+psycopg://herdsman:***@127.0.0.1:1/herdsman token ***\n"


def test_url_password():
    from herdsman.secrets import url_password

    assert url_password(URL) == "hunter2" and url_password("u:p@ss@h/d") == "p@ss"
    assert url_password("sqlite:////tmp/a@b.db") == url_password("postgresql://u@h/d") == url_password("") == ""


@contextlib.contextmanager
def redaction_undone(secret):
    """Takes off again the redaction filters (those knowing `secret`) a test put on this process's handlers: some of
    pytest's handlers are put back on the root logger in every later test."""
    try:
        yield
    finally:
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for h in getattr(logger, "handlers", []):
                for f in [f for f in h.filters if isinstance(f, RedactingFilter) and secret in f.secrets]:
                    h.removeFilter(f)


def _redacting(secret):
    return any(isinstance(f, RedactingFilter) and secret in f.secrets
               for h in logging.getLogger().handlers for f in h.filters)


def _actor_config(tmp_path, token):
    return load_config(overrides={"run_dir": str(tmp_path), "api": {"token": token},
                                  "store": {"url": URL.replace("hunter2", f"pw-{token}")}})


def test_the_controller_actor_redacts_its_logs(tmp_path, monkeypatch, caplog):
    import orchestrator.controller
    from orchestrator.controller import _RayController

    monkeypatch.setattr(orchestrator.controller.Controller, "__init__", lambda self, config: setattr(
        self, "recovered", None))  # what the Ray actor runs first, without a cluster behind it
    token = "controller-actor-token-0123"
    with redaction_undone(token):
        assert not _redacting(token)
        _RayController(_actor_config(tmp_path, token))
        assert _redacting(token) and _redacting(f"pw-{token}")
        logging.getLogger("herdsman.controller").error("refused: %s (%s)", token, f"pw-{token}")
    assert "refused: *** (***)" in caplog.text and token not in caplog.text


def test_the_agent_actor_redacts_its_logs(tmp_path, monkeypatch):
    import agents.ray_agent

    class NoAgent:
        def __init__(self, host, config, sink):
            pass

        start_metrics = start = lambda self: None

    monkeypatch.setattr(agents.ray_agent, "NodeAgent", NoAgent)
    token = "agent-actor-token-0123456"
    with redaction_undone(token):
        assert not _redacting(token)
        agents.ray_agent.AgentService("host-1", _actor_config(tmp_path, token))
        assert _redacting(token) and _redacting(f"pw-{token}")


def test_the_report_of_an_unknown_job_hides_the_store_password():
    from orchestrator.report import summarize

    class NoJobs:
        url = URL

        def job(self, name):
            return None

        def jobs(self):
            return []

    with pytest.raises(HerdsmanError) as e:
        summarize(NoJobs(), "nope")
    assert "hunter2" not in str(e.value) and "herdsman:***@127.0.0.1:1" in str(e.value)


def test_the_controller_writes_its_resolved_config_private_and_without_secrets(tmp_path):
    """The file every rank reads, as the controller itself writes it (the store is injected, so the PostgreSQL URL
    in the configuration is never connected to: only its text matters here)."""
    from orchestrator.controller import Controller
    from orchestrator.store import Store
    from tests.test_controller import Clock, FakeFleet

    cfg = load_config(overrides={"run_dir": str(tmp_path / "run"), "job": "unit", "api": {"token": TOKEN},
                                 "store": {"url": URL}})
    clock, store = Clock(), Store(f"sqlite:///{tmp_path / 'h.db'}")
    old_umask = os.umask(0o022)
    try:
        ctrl = Controller(cfg, store=store, fleet=FakeFleet(clock), clock=clock)
    finally:
        os.umask(old_umask)
    try:
        path = tmp_path / "run" / "herdsman.resolved.toml"
        assert ctrl.config_path == path and stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert TOKEN not in text and "hunter2" not in text and "herdsman:***@127.0.0.1:1" in text
        assert load_config(path).trainer == cfg.trainer  # what a rank needs is all there
        assert ctrl.records.flush(5)
        stored = store.job("unit").config  # the copy kept with the job's records
        assert stored and TOKEN not in stored and "hunter2" not in stored
    finally:
        ctrl.records.close(timeout_s=1)
        store.close()
