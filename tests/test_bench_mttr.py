"""bench/mttr.py reads the controller's decisions for how long each failure waited for flight-recorder dumps (the
e2e hang test checks the controller writes that line)."""

from bench.mttr import _dump_waits


def test_the_dump_wait_of_each_attempt_is_read_from_the_decisions():
    decisions = [
        "06:40:01.120 asked live ranks [2] for their flight-recorder dumps",
        "06:40:02.371 flight-recorder dumps of attempt 3: 1 of 1 asked in 1.25 s",
        "06:40:02.400 verdict faulty_gpu (1.00) hosts=['host-2'] ranks=[1]: ...",
        "06:41:09.002 flight-recorder dumps of attempt 5: 0 of 2 asked in 3.01 s",
        "06:41:10.000   flight recorder: process group 0: stuck at collective #42",
    ]
    assert _dump_waits(decisions) == {3: 1.25, 5: 3.01}
    assert _dump_waits(decisions[:1] + decisions[2:3]) == {}  # asked nobody: no wait to report
