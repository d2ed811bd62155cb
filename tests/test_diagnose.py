import signal

from herdsman.events import Evidence, EvidenceKind, Severity
from herdsman.taxonomy import Action, RootCause
from orchestrator.diagnose import Failure, RankFailure, diagnose

HOSTS = ("h1", "h2", "h3")
PEER = "RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:1234"


def xid(host, code, t=100.0, gpu=0):
    from agents.gpu import xid_evidence
    return xid_evidence(host, gpu, code, t)


def killed(rank, host, t=100.5):
    return RankFailure(rank, host, t, -signal.SIGKILL, "")


def peer(rank, host, t=100.7):
    return RankFailure(rank, host, t, 1, "Traceback (most recent call last):\n ...\n" + PEER)


def test_xid79_is_faulty_gpu_on_that_host():
    f = Failure(100.0, (killed(1, "h2"), peer(0, "h1"), peer(2, "h3")), HOSTS)
    v = diagnose(f, [xid("h2", 79), Evidence("h2", EvidenceKind.GPU_LOST, 100.0, "lost", Severity.CRITICAL, gpu=0)])
    assert v.cause == RootCause.FAULTY_GPU and v.hosts == ("h2",) and v.ranks == (1,)
    assert v.confidence >= 0.9 and v.action == Action.EVICT
    assert any("Xid 79" in line for line in v.evidence)


def test_xid48_is_hbm3_even_with_peer_noise():
    f = Failure(100.0, (killed(2, "h3"), peer(0, "h1")), HOSTS)
    v = diagnose(f, [xid("h3", 48), Evidence("h3", EvidenceKind.GPU_ECC, 100.1, "DRAM", Severity.CRITICAL,
                                             gpu=0, attrs={"memory": "dram"})])
    assert v.cause == RootCause.GPU_HBM3_MEMORY and v.hosts == ("h3",)


def test_sram_ecc_and_gsp():
    f = Failure(100.0, (killed(0, "h1"),), HOSTS)
    sram = Evidence("h1", EvidenceKind.GPU_ECC, 100.0, "SRAM", Severity.CRITICAL, gpu=1, attrs={"memory": "sram"})
    assert diagnose(f, [sram]).cause == RootCause.GPU_SRAM_MEMORY
    assert diagnose(f, [xid("h1", 119)]).cause == RootCause.GPU_SYSTEM_PROCESSOR


def test_hardware_evidence_outside_the_job_is_ignored():
    f = Failure(100.0, (killed(0, "h1"),), HOSTS)
    assert diagnose(f, [xid("h9", 79)]).cause == RootCause.UNKNOWN


def test_non_fatal_xid_does_not_decide():
    f = Failure(100.0, (killed(0, "h1"),), HOSTS)
    assert diagnose(f, [xid("h1", 63)]).cause == RootCause.UNKNOWN


def test_python_exception_without_hardware_is_software_bug():
    bug = RankFailure(0, "h1", 100.0, 1, "Traceback (most recent call last):\n  File \"train.py\", line 3\n"
                                         "ValueError: shapes (4, 128) and (256,) not aligned")
    f = Failure(100.0, (bug, peer(1, "h2"), peer(2, "h3")), HOSTS)
    v = diagnose(f, [])
    assert v.cause == RootCause.SOFTWARE_BUG and v.ranks == (0,)
    assert v.action == Action.RESTART
    assert v.evidence == ("[h1 rank0] ValueError: shapes (4, 128) and (256,) not aligned",)


def test_import_error_is_dependency():
    f = Failure(100.0, (RankFailure(0, "h1", 100.0, 1, "Traceback...\nImportError: libcudnn.so.9: cannot open"),),
                HOSTS)
    v = diagnose(f, [])
    assert v.cause == RootCause.DEPENDENCY and v.action == Action.STOP


def test_peer_symptoms_alone_are_not_a_software_bug():
    f = Failure(100.0, (peer(0, "h1"), peer(1, "h2")), HOSTS)
    assert diagnose(f, []).cause == RootCause.UNKNOWN


def test_a_killed_rank_without_evidence_is_unknown_and_blames_its_host():
    v = diagnose(Failure(100.0, (killed(1, "h2"), peer(0, "h1")), HOSTS), [])
    assert v.cause == RootCause.UNKNOWN and v.hosts == ("h2",) and v.confidence < 0.5


def test_thermal_warning_on_a_healthy_peer_does_not_decide():
    hot = Evidence("h3", EvidenceKind.GPU_THERMAL, 99.0, "thermal slowdown", Severity.WARNING, gpu=0)
    bug = RankFailure(0, "h1", 100.0, 1, "Traceback\nKeyError: 'x'")
    assert diagnose(Failure(100.0, (bug,), HOSTS), [hot]).cause == RootCause.SOFTWARE_BUG


def test_critical_host_log_evidence_decides_host_causes():
    from agents.host import load_rules, match_line
    rules = load_rules()
    f = Failure(100.0, (killed(0, "h1"), peer(1, "h2")), HOSTS)
    for line, cause in [
        ("EDAC MC0: 1 UE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0", RootCause.SYSTEM_MEMORY),
        ("nvme nvme0: I/O tag 12 (a07b) opcode 0x1 (Write) QID 4 timeout, aborting", RootCause.SSD),
        ("pcieport 0000:00:03.0: AER: Uncorrected (Fatal) error received: 0000:04:00.0", RootCause.IO_EXPANSION_BOARD),
        ("mce: [Hardware Error]: CPU 3: Machine Check: 0 Bank 5: be00000000800400", RootCause.CPU),
    ]:
        v = diagnose(f, [match_line(rules, "h1", line, 99.0)])
        assert v.cause == cause and v.hosts == ("h1",), (line, v)
    warn = match_line(rules, "h1", "EDAC MC0: 1 CE memory read error on DIMM", 99.0)
    assert diagnose(f, [warn]).cause == RootCause.UNKNOWN  # a corrected error decides nothing


def hang_evidence(rank, host):
    return Evidence(host, EvidenceKind.TRAINER_HANG, 100.2, f"rank {rank} never joined: process group default_pg: "
                    "stuck at collective #41 gloo:all_gather", Severity.WARNING, rank=rank)


def test_hang_blames_the_rank_that_never_joined_not_the_ranks_that_timed_out():
    timed_out = [RankFailure(r, h, 100.0, 1, "Traceback\nRuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] "
                             "Timed out waiting 5000ms for recv operation to complete") for r, h in ((0, "h1"), (2, "h3"))]
    v = diagnose(Failure(100.0, tuple(timed_out), HOSTS), [hang_evidence(1, "h2")])
    assert v.cause == RootCause.NCCL_WATCHDOG_TIMEOUT and v.ranks == (1,) and v.hosts == ("h2",)
    assert v.action == Action.RESTART and "never joined" in v.evidence[0]


def test_hang_on_a_host_with_hardware_evidence_is_that_hardware():
    v = diagnose(Failure(100.0, (), HOSTS), [hang_evidence(1, "h2"), xid("h2", 119)])
    assert v.cause == RootCause.GPU_SYSTEM_PROCESSOR and v.hosts == ("h2",) and v.ranks == (1,)
    assert v.confidence >= 0.9



def test_a_silent_host_is_blamed_as_unknown():
    silent = Evidence("h3", EvidenceKind.TRAINER_EXIT, 100.0, "agent silent for more than 10 s", Severity.WARNING,
                      attrs={"reason": "AgentSilent"})
    v = diagnose(Failure(100.0, (), HOSTS), [silent])
    assert v.cause == RootCause.UNKNOWN and v.hosts == ("h3",) and v.action == Action.RESTART


def test_the_rank_that_fails_its_parameter_check_is_blamed_not_its_peers():
    tb = "Traceback (most recent call last):\n  File \"trainer/train.py\", line 213, in train\n"
    f = Failure(100.0, (
        RankFailure(0, "h1", 100.2, 1, tb + "trainer.sdc.PeerCorruption: stopping at step 7: rank(s) [1] failed "
                                            "their parameter check; rolling back to a checkpoint of step <= 5"),
        RankFailure(1, "h2", 100.1, 1, tb + "trainer.sdc.SilentDataCorruption: parameter checksum mismatch on rank 1 "
                                            "(h2) at step 7: its parameters changed outside the optimizer")), HOSTS)
    v = diagnose(f, [])
    assert v.cause == RootCause.SILENT_DATA_CORRUPTION and v.hosts == ("h2",) and v.ranks == (1,)
    assert v.action == Action.EVICT and "parameter checksum mismatch on rank 1" in v.evidence[0]


def test_a_rank_that_crashed_itself_is_a_software_bug_not_a_silent_kill():
    crashed = RankFailure(1, "h2", 100.5, -signal.SIGSEGV, "")
    v = diagnose(Failure(100.0, (crashed, peer(0, "h1")), HOSTS), [])
    assert v.cause == RootCause.SOFTWARE_BUG and v.confidence < 1.0
    v = diagnose(Failure(100.0, (crashed,), HOSTS), [xid("h2", 79)])  # hardware evidence still explains a crash
    assert v.cause == RootCause.FAULTY_GPU
