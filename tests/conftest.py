import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.trainer_runs import free_port


def _pg_bin() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL server on loopback (Debian's postgresql package). CI installs it; elsewhere the
    PostgreSQL tests are skipped when it is missing."""
    bin_dir = _pg_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries are missing (CI must install Debian's postgresql)")
        pytest.skip("no PostgreSQL server installed")
    # pytest's tmp dirs are private to root; the server runs as the postgres user
    top = tempfile.mkdtemp(prefix="herdsman-pg-")
    data = os.path.join(top, "data")
    os.mkdir(data)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(top, "postgres")
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run(as_pg + [f"{bin_dir}/initdb", "-D", data, "-U", "postgres", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run(as_pg + [f"{bin_dir}/pg_ctl", "-D", data, "-w", "-l", os.path.join(top, "log"), "-o",
                            f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"], check=True,
                   capture_output=True)
    try:
        for _ in range(50):
            if subprocess.run(as_pg + [f"{bin_dir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                                       "herdsman"], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/herdsman"
    finally:
        subprocess.run(as_pg + [f"{bin_dir}/pg_ctl", "-D", data, "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def make(tmp_path):
    """Build controllers on a fake fleet and clock, stepped one tick at a time (tests/controller_fakes.py)."""
    from tests.controller_fakes import controllers

    yield from controllers(tmp_path)


def artifacts_dir() -> Path:
    """Where tests leave files for a human to look at (screenshots, reports)."""
    return Path(os.environ.get("HERDSMAN_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))


_SESSION_START = time.time()


def pytest_terminal_summary(terminalreporter):
    d = artifacts_dir()
    written = sorted(p for p in d.rglob("*") if p.is_file() and p.stat().st_mtime >= _SESSION_START) if d.exists() else []
    if written:
        terminalreporter.section("artifacts written by this run")
        for p in written:
            terminalreporter.write_line(str(p))
