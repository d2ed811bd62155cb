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
