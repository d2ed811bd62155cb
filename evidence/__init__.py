"""Text and telemetry -> Evidence: one rule set and one engine for the agent (kernel log), the controller (rank
stderr) and `herdsman diagnose`.

- `rules.toml`  the rules, as data: id, patterns, cause, kind, how decisive, the page that documents the message;
- `rules.py`    loading and checking them, compiled for RE2 (linear time on any input, all rules in one pass);
- `records.py`  lines -> records: host/rank prefixes stripped, continuation lines grouped (NVRM multi-line messages,
                Python tracebacks, nvidia-smi -q sections, mcelog blocks, same-device kernel blocks, JSON events);
- `engine.py`   records -> Evidence (Xid and MCE codes decoded through their catalogues) and the failed ranks a
                log shows (tracebacks, torchrun summaries);
- `mce.py`      decoding of x86 machine-check status words: memory controller errors vs CPU-internal errors.

Imports only `herdsman`. Deciding a cause from evidence stays in orchestrator/diagnose.py.
"""
