"""The one-way import rule between Herdsman's packages, checked on the source (not just written in a docstring).

    herdsman/      the shared vocabulary and contracts: imports nothing of ours
    evidence/      the text rules: herdsman only
    trainer/       the embedded trainer: herdsman only
    agents/        per-node agents: herdsman and evidence
    orchestrator/  the controller and its users: anything below it
    bench/, tests/ anything
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = {"herdsman", "evidence", "trainer", "agents", "orchestrator", "bench", "tests"}
ALLOWED = {
    "herdsman": {"herdsman"},
    "evidence": {"herdsman", "evidence"},
    "trainer": {"herdsman", "trainer"},
    "agents": {"herdsman", "evidence", "agents"},
    "orchestrator": {"herdsman", "evidence", "trainer", "agents", "orchestrator"},
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out & OURS


def test_packages_import_only_what_is_below_them():
    broken = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = imports_of(path) - allowed
            if bad:
                broken.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not broken, "\n".join(broken)


def test_the_rule_has_teeth(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from orchestrator.controller import Controller\n")
    assert imports_of(bad) == {"orchestrator"}


def modules_loaded_by(module: str) -> set[str]:
    import subprocess
    import sys

    code = f"import sys, {module}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return set(out.split())


def test_the_rank_actor_and_the_controller_never_import_torch():
    """A rank actor's Ray worker (one per rank, started with every job) and the controller only write control
    files and start processes: importing torch there cost ~3 CPU-seconds per rank before the first step."""
    for module in ("orchestrator.workers", "orchestrator.controller", "agents.ray_agent"):
        assert "torch" not in modules_loaded_by(module), module
    assert "torch" in modules_loaded_by("trainer.rejoin")  # the check sees torch where it is imported
