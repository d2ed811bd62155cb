"""The shared rule engine (evidence/): records, rules, decoders, linear time on hostile text, one verdict for the
same text through the agent, the controller and `herdsman diagnose`, and the score on the public corpus."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.host import HostMonitor
from evidence import mce
from evidence.engine import scan
from evidence.records import records
from evidence.rules import default
from herdsman.events import RankFailure
from herdsman.taxonomy import RootCause
from orchestrator.diagnose import Failure, diagnose
from orchestrator.diagnose_eval import evaluate, load_corpus, verdict_of_text
from tests.bounds import bounded

CORPUS = sorted(str(p) for p in (Path(__file__).parent / "corpus").glob("*.jsonl"))


def cause_of(text: str) -> str:
    return verdict_of_text(text).cause.value


# --- records ---------------------------------------------------------------------------------------------------

def test_a_multi_line_nvrm_message_is_one_record():
    text = ("Nov 26 03:12:07 node-7 kernel: NVRM: The NVIDIA GPU 0000:b3:00.0\n"
            "Nov 26 03:12:07 node-7 kernel: NVRM: (PCI ID: 10de:20b2) installed in this system has\n"
            "Nov 26 03:12:07 node-7 kernel: NVRM: fallen off the bus and is not responding to commands.\n")
    (rec,) = list(records(text.splitlines()))
    assert rec.host == "node-7" and rec.kind == "nvrm" and len(rec.lines) == 3
    v = verdict_of_text(text)
    assert v.cause == RootCause.FAULTY_GPU and v.hosts == ("node-7",)


def test_interleaved_tracebacks_of_two_ranks_stay_apart():
    text = ("[rank0]: Traceback (most recent call last):\n[rank1]: Traceback (most recent call last):\n"
            "[rank0]:   File \"a.py\", line 1, in f\n[rank1]:   File \"b.py\", line 2, in g\n"
            "[rank1]: ImportError: libnccl.so.2: cannot open shared object file\n[rank0]: KeyError: 'x'\n")
    s = scan(text.splitlines())
    assert sorted((f.rank, f.message.splitlines()[-1]) for f in s.failures) == [
        (0, "KeyError: 'x'"), (1, "ImportError: libnccl.so.2: cannot open shared object file")]
    assert cause_of(text) == "dependency"  # a broken environment explains both


def test_nvidia_smi_sections_match_across_lines():
    old_layout = "    ECC Errors\n        Volatile\n            Double Bit\n                Device Memory : 4\n"
    assert cause_of(old_layout) == "gpu_hbm3_memory"
    remap = ("GPU 00000000:3B:00.0\n    Remapped Rows\n        Correctable Error : 0\n        Uncorrectable Error : 0\n"
             "        Pending : No\n        Remapping Failure Occurred : Yes\n")
    assert cause_of(remap) == "gpu_hbm3_memory"
    healthy = remap.replace("Occurred : Yes", "Occurred : No")
    assert cause_of(healthy) == "unknown"


def test_json_events_and_mcelog_blocks_are_records():
    azure = '{\n  "Events": [\n    {\n      "EventId": "1",\n      "EventType": "Reboot",\n      "ResourceType": "VirtualMachine"\n    }\n  ]\n}'
    assert [r.kind for r in records(azure.splitlines())] == ["json"] and cause_of(azure) == "host_maintenance"
    memory = ("Hardware event. This is not a software error.\nMCE 0\nCPU 1 BANK 8\nMCG status:\nMCi status:\n"
              "Uncorrected error\nSTATUS be00000000010091 MCGSTATUS 0\n")
    cache = memory.replace("be00000000010091", "be00000000000135")
    assert cause_of(memory) == "system_memory" and cause_of(cache) == "cpu"


# --- decoders --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("status, cause, uncorrected", [
    (0xBE00000000800400, RootCause.CPU, True),  # internal (IERR-like)
    (0x8C00004000010091, RootCause.SYSTEM_MEMORY, False),  # memory controller, corrected (filter bit set)
    (0x9400000000010015, RootCause.CPU, False),  # L1 TLB
    (0x98444000010C0176, RootCause.CPU, False),  # L2 cache data
    (0xB200000000000E0F, RootCause.CPU, True),  # bus/interconnect
])
def test_mca_status_words(status, cause, uncorrected):
    c, uc, _ = mce.decode_status(status)
    assert (c, uc) == (cause, uncorrected)
    assert mce.parse_hex("1" * 17) is None and mce.decode_status(-1) is None


@pytest.mark.parametrize("line, cause", [
    ("NVRM: Xid (PCI:0000:1b:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)",
     "faulty_gpu"),
    ("NVRM: Xid (PCI:0000:ca:00): 94, pid=1, name=python, Contained: SM (0x1). RST: No, D-RST: No", "gpu_sram_memory"),
    ("NVRM: Xid (PCI:0000:ca:00): 94, pid=1, name=python, Ch 00000008, errorString CTX SWITCH TIMEOUT", "gpu_hbm3_memory"),
    ("NVRM: Xid (PCI:0000:ca:00): 149, NETIR_LINK_EVT Fatal XC0 i0 Link 04 (0x00000000)", "faulty_gpu"),
    ("NVRM: Xid (PCI:0000:ca:00): 13, pid=1, Graphics SM Warp Exception on (GPC 0, TPC 1, SM 0)", "software_bug"),
    ("NVRM: Xid (PCI:0000:ca:00): 45, pid=1, Ch 00000001 caused by previous Xid 119", "gpu_system_processor"),
    ("NVRM: Xid (PCI:0000:ca:00): 201, pid=1, something new", "faulty_gpu"),  # unlisted: still a GPU error
])
def test_xid_catalogue(line, cause):
    assert cause_of(line) == cause


def test_aer_on_the_gpu_endpoint_is_the_gpu_and_on_a_port_is_the_board():
    port = ("pcieport 0000:00:03.0: AER: Uncorrected (Fatal) error received: 0000:00:03.0\n"
            "pcieport 0000:00:03.0: PCIe Bus Error: severity=Uncorrected (Fatal), type=Transaction Layer, (Receiver ID)\n"
            "pcieport 0000:00:03.0:   device [8086:2030] error status/mask=00004000/00000000\n")
    gpu = ("nvidia 0000:3b:00.0: AER: PCIe Bus Error: severity=Uncorrected (Non-Fatal), type=Transaction Layer\n"
           "nvidia 0000:3b:00.0:   device [10de:2330] error status/mask=00004000/00000000\n")
    assert cause_of(port) == "io_expansion_board" and cause_of(gpu) == "faulty_gpu"


# --- one verdict, three paths ------------------------------------------------------------------------------------

SAME = [
    "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.",
    "NVRM: Xid (PCI:0000:5e:00): 48, pid=3312, name=python3, An uncorrectable double bit error (DBE) has been detected",
    "EDAC MC0: 1 UE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0 (channel:1 slot:0 page:0x1234)",
    "nvme nvme0: I/O tag 412 (319c) opcode 0x1 (Write) QID 7 timeout, aborting",
    "RuntimeError: CUDA error: uncorrectable ECC error encountered",
    "ImportError: /opt/conda/lib/python3.11/site-packages/flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDevice",
    "[E ProcessGroupNCCL.cpp:475] [Rank 3] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1021, "
    "OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600093 milliseconds before timing out.",
]


@pytest.mark.parametrize("text", SAME)
def test_the_same_text_gives_the_same_verdict_through_agent_controller_and_cli(text, tmp_path):
    # the CLI
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "diagnose", "--json", "--host", "h1"], input=text,
                       capture_output=True, text=True, timeout=60)
    cli = json.loads(r.stdout)["category"]
    # the controller: the text is a failed rank's stderr tail
    live = diagnose(Failure(100.0, (RankFailure(0, "h1", 100.0, 1, text),), ("h1",)), []).cause.value
    # the agent: the text is a kernel-log line on its host; the controller diagnoses a failure with that evidence
    log = tmp_path / "kern.log"
    log.write_text("")
    agent = HostMonitor("h1", kernel_log=str(log), sys_root=str(tmp_path / "nosys"))
    agent.cycle()  # the tailer starts at the end of the log
    log.write_text(text + "\n")
    ev = agent.cycle()
    from_agent = diagnose(Failure(100.0, (), ("h1",)), ev).cause.value
    assert cli == live == from_agent != "unknown", (cli, live, from_agent)


# --- hostile input ---------------------------------------------------------------------------------------------

ADVERSARIAL = [
    "a" * 100_000, " " * 100_000, "1" * 100_000, "Xid " * 25_000, "NVRM: " + "(" * 100_000,
    "power supply " * 8_000, "EDAC " + "MC0: " * 20_000, "node-1: " * 12_500, "[rank1]:" * 12_000,
    "Traceback (most recent call last):" + "\n  File x" * 10_000, "fan " * 25_000 + "fail",
    "GSP " * 25_000, "NET/IB : Got completion from peer " + "x" * 100_000,
    "Nov 23 12:00:01 " + "a1" * 50_000, "\t" * 50_000 + "Remapping Failure Occurred : " + "Y" * 50_000,
]


@pytest.mark.parametrize("i", range(len(ADVERSARIAL)))
def test_every_rule_is_linear_on_100kb_adversarial_lines(i):
    rules = default()
    text = ADVERSARIAL[i]
    t0 = time.perf_counter()
    for r in rules.rules:  # every rule on its own, not only the set
        for p in r.compiled:
            p.search(text)
    scan(text.splitlines() or [text])
    assert time.perf_counter() - t0 < 5.0  # the old cubic PowerSupplyFault took 23 s on 2,000 characters


def test_bad_input_gives_a_verdict_never_a_traceback(tmp_path):
    cases = {
        "binary": bytes(range(256)) * 400,
        "nul": b"NVRM: Xid (PCI:0000:3b:00): 79\x00\x00, GPU has fallen off the bus\n" * 3,
        "long": b"x" * (50 << 20) + b"\nNVRM: Xid (PCI:0000:3b:00): 48, pid=1, DBE\n",
        "digits": b"NVRM: Xid (PCI:0000:3b:00): " + b"9" * 5000 + b", pid=1\n[rank" + b"7" * 5000 + b"]: KeyError: 'x'\n",
    }
    for name, data in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "diagnose", "--json", str(p)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (name, r.stderr[-2000:])
        v = json.loads(r.stdout)
        if name in ("nul", "long"):
            assert v["category"] in ("faulty_gpu", "gpu_hbm3_memory"), (name, v)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.text(max_size=200), max_size=30))
def test_no_text_crashes_the_engine_or_diagnosis(lines):
    with bounded("evidence text (random)", seconds=2.0, mib=64):
        s = scan(lines)
        diagnose(Failure(0.0, tuple(s.failures), tuple(s.hosts)), s.evidence)


EXCERPTS = [it["text"] for it in load_corpus(CORPUS)]
HUGE_NUMBERS = ["9" * 5000, "1" * 400, str(2**64), str(2**63), "-1", "0" * 300, "1e999", "0x" + "f" * 200, "NaN"]


@st.composite
def mutated_excerpts(draw) -> str:
    """A real excerpt of the public corpus (tests/corpus/*.jsonl), mutated as logs get damaged and interleaved: lines
    of another excerpt spliced in, lines repeated, numbers made huge, NULs inserted, lines and the text cut short."""
    lines = draw(st.sampled_from(EXCERPTS)).splitlines() or [""]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1)) if lines else 0
        how = draw(st.sampled_from(["splice", "duplicate", "number", "nul", "cut_line", "truncate", "stretch"]))
        if how == "splice":
            other = draw(st.sampled_from(EXCERPTS)).splitlines()
            a = draw(st.integers(0, len(other)))
            lines[i:i] = other[a:a + draw(st.integers(1, 20))]
        elif how == "duplicate" and lines:
            lines[i:i] = [lines[i]] * draw(st.integers(1, 300))
        elif how == "number" and lines:
            digits = list(re.finditer(r"\d+", lines[i]))
            huge = draw(st.sampled_from(HUGE_NUMBERS))
            if digits:
                m = draw(st.sampled_from(digits))
                lines[i] = lines[i][:m.start()] + huge + lines[i][m.end():]
            else:
                lines[i] += " " + huge
        elif how == "nul" and lines:
            at = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:at] + "\x00" * draw(st.integers(1, 64)) + lines[i][at:]
        elif how == "cut_line" and lines:
            lines[i] = lines[i][:draw(st.integers(0, len(lines[i])))]
        elif how == "stretch" and lines:  # one line made long (up to ~50x, within the engine's line bound)
            lines[i] = lines[i] * draw(st.integers(2, 50))
        elif how == "truncate":
            text = "\n".join(lines)
            lines = text[:draw(st.integers(0, len(text)))].splitlines()
    return "\n".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_excerpts())
def test_damaged_real_logs_give_a_verdict_within_bounds(text):
    with bounded("evidence text (mutated corpus)", seconds=2.0, mib=64):
        v = verdict_of_text(text)
    assert isinstance(v.cause, RootCause) and 0.0 <= v.confidence <= 1.0
    assert all(isinstance(line, str) for line in (*v.evidence, *v.alternatives, v.reason))


def test_the_prefilter_never_changes_a_verdict():
    for it in load_corpus(CORPUS):
        lines = it["text"].splitlines()
        a, b = scan(lines), scan(lines, prefilter=False)
        va = diagnose(Failure(0.0, tuple(a.failures), tuple(a.hosts)), a.evidence)
        vb = diagnose(Failure(0.0, tuple(b.failures), tuple(b.hosts)), b.evidence)
        assert va.cause == vb.cause, it["id"]


# --- honest confidence -------------------------------------------------------------------------------------------

def test_unknown_when_nothing_decides_and_losing_candidates_are_listed():
    v = verdict_of_text("something went wrong\njob failed")
    assert v.cause == RootCause.UNKNOWN and v.confidence <= 0.3
    v = verdict_of_text("NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.\n"
                        "EDAC MC0: 1 CE memory read error on DIMM_A1\nTraceback (most recent call last):\n"
                        "  File \"t.py\", line 1\nRuntimeError: CUDA error: unspecified launch failure")
    assert v.cause == RootCause.FAULTY_GPU and any("Xid 79" in e for e in v.evidence)
    assert any(a.startswith("system_memory (supports)") for a in v.alternatives)
    assert any(a.startswith("software_bug") for a in v.alternatives)
    weak = verdict_of_text("EDAC MC0: 1 CE memory read error on CPU_SrcID#0_Ha#0_Chan#1_DIMM#0")
    assert weak.cause == RootCause.SYSTEM_MEMORY and weak.confidence < 0.6 and "supports-level" in weak.reason


# --- the public corpus -------------------------------------------------------------------------------------------

def test_the_corpus_is_real_labelled_and_split():
    items = load_corpus(CORPUS)
    assert len(items) >= 200 and len({it["id"] for it in items}) == len(items)
    assert all(it["source"].startswith("http") and it["split"] in ("dev", "holdout") for it in items)
    holdout = sum(it["split"] == "holdout" for it in items) / len(items)
    assert 0.28 < holdout < 0.4


def test_corpus_score_holds():
    """CI holds the overall figure; the README publishes both splits and the confusion matrix."""
    items = load_corpus(CORPUS)
    s = evaluate(items)
    assert s.accuracy >= 0.90, s.misses
    assert s.accuracy_clear >= 0.95, [m for m in s.misses if not m["ambiguous"]]


def test_formats_from_the_second_corpus_round():
    """Watchdog C++ frames without the summary line, iproute2 `rdma link`, UCX's signal handler."""
    assert cause_of("frame #1: c10d::ProcessGroupNCCL::WorkNCCL::checkTimeout(std::optional<std::chrono::duration<long, "
                    "std::ratio<1l, 1000l> > >) + 0x1d2 (0x1554e9e0f8f2 in /x/libtorch_cuda.so)") == "nccl_watchdog_timeout"
    assert cause_of("link mlx5_7/1 subnet_prefix fe80:0000:0000:0000 lid 3403 sm_lid 1 lmc 0 state DOWN "
                    "physical_state POLLING") == "nic"
    assert cause_of("link mlx5_7/1 subnet_prefix fe80:0000:0000:0000 lid 3403 sm_lid 1 lmc 0 state ACTIVE "
                    "physical_state LINK_UP") == "unknown"
    assert cause_of("[h:5283 :0:5704] Caught signal 7 (Bus error: nonexistent physical address)") == "software_bug"


ROUND3 = Path(__file__).parent / "corpus" / "round3" / "first_look.jsonl"


def test_formats_from_the_third_corpus_round():
    """EFA and libfabric, NVLink in CUDA's words, dcgmi diag tables, LNet over o2ib, the power brake in prose;
    and NIC driver names only as words ("Panic" is not a NIC, "device" not the ice driver)."""
    assert cause_of("Kernel Panic!!! *** Fatal error in the device driver") == "unknown"
    assert cause_of("efa 0000:10:1b.0 efa_0: Failed to process command ALLOC_PD (opcode 14) comp_status 1 "
                    "err -12") == "nic"
    assert cause_of("NCCL WARN NET/OFI Couldn't find any optimal provider") == "dependency"
    assert cause_of("RuntimeError: CUDA error: uncorrectable NVLink error was detected during the execution") == \
        "faulty_gpu"
    assert cause_of("| Fail - GPU: 3  | Memory test failed") == "faulty_gpu"
    assert cause_of("GPU 0000:3b:00.0: asserted hardware power brake") == "power_supply"
    assert cause_of("    HW Power Brake Slowdown    : Not Active") == "unknown"


def test_the_third_rounds_first_look_set_holds_its_score():
    """25 excerpts kept apart from the gated corpus (tests/corpus/round3/): first look 44 %, 80 % after the format
    rules; its 5 misses are label calls no documented format settles, and the whole would be 89.5 % with them in."""
    items = load_corpus([str(ROUND3)])
    assert len(items) == 25 and not {it["id"] for it in items} & {it["id"] for it in load_corpus(CORPUS)}
    s = evaluate(items)
    assert s.accuracy >= 0.8 and s.accuracy_clear == 1.0, s.misses


ROUND4 = Path(__file__).parent / "corpus" / "round4" / "first_look.jsonl"


def test_formats_from_the_fourth_corpus_round():
    """InfiniBand port error counters (ibqueryerrors, perfquery), UCX's UD timeout, NVIDIA's field diagnostic, a
    POWER core checkstop, ibstat quoted in an issue, BMC fan monitors, replica divergence in prose; and what is
    not a fault: zero counters, a passing MODS code, an active port."""
    fabric = "network_switch_cable"
    assert cause_of("GUID 0x1070fd0300370ea2 port 7: [LinkDownedCounter == 25 (25.000)] [PortRcvErrors == 26 (26.000)]") \
        == fabric
    assert cause_of("SymbolErrorCounter:..............1233") == fabric
    assert cause_of("LinkDownedCounter:...............0") == "unknown"
    assert cause_of("GUID 0x1070fd0300370ea2 port 7: [PortXmitWait == 146 (146)]") == "unknown"
    assert cause_of("[jazz15:39570:0:39570]       ud_ep.c:248  Fatal: UD endpoint 0x3b9a060: unhandled timeout "
                    "error") == fabric
    assert cause_of("Test GpuStress FAIL: MODS-000000900167 (GFW boot failure)") == "faulty_gpu"
    assert cause_of("MODS-000000000000 | OK") == "unknown"
    assert cause_of("  16.08733|  Signature Description    : pu.core:k0:n0:s0:p01:c23 (COREFIR[14]) Machine check "
                    "and ME = 0 Err") == "cpu"
    assert cause_of("> > State: Down") == "nic"
    assert cause_of("> State: Active") == "unknown"
    assert cause_of("phosphor-dbus-monitor[1393]: The system shut down due to not enough functional fans") == \
        "server_chassis"
    assert cause_of("We observed a divergence of the weights across the DP axis") == "silent_data_corruption"


def test_every_xid_a_record_names_is_read():
    """A prose summary naming a cascade: the application-class Xid first, the SRAM error after it; the hardware one
    decides. Each distinct code once, at most MAX_XIDS_PER_RECORD of them, however often a hostile line repeats."""
    text = ("XID 137 (NVLink TLC RX PRIV Error) was reported across 6 of 8 GPUs, immediately followed by XID 94 with "
            "the payload Contained: SM (0x1). RST: No, D-RST: No")
    assert cause_of(text) == "gpu_sram_memory"
    from evidence.engine import MAX_XIDS_PER_RECORD, text_evidence

    codes = [e.code for e in text_evidence(text, "h", None, 0.0) if e.kind.value == "gpu_xid"]
    assert sorted(codes) == [94, 137]
    many = " ".join(f"Xid {n}" for n in range(1, 200)) + " " + "Xid 79 " * 5000
    codes = [e.code for e in text_evidence(many, "h", None, 0.0) if e.kind.value == "gpu_xid"]
    assert len(codes) == len(set(codes)) == MAX_XIDS_PER_RECORD


def test_the_fourth_rounds_first_look_set_holds_its_score():
    """48 excerpts gathered Dec 1 in families the corpus was thin on (GSP, SRAM, thermal, power, CPU, chassis,
    SDC, IB counters), kept apart from the gated corpus: first look 56 % top-1 (22 of 26 unambiguous), 77 % (26 of
    26) after the format rules above and reading every Xid of a record; its 11 misses are all marked ambiguous."""
    items = load_corpus([str(ROUND4)])
    assert len(items) == 48 and not {it["id"] for it in items} & {it["id"] for it in load_corpus(CORPUS + [str(ROUND3)])}
    s = evaluate(items)
    assert s.accuracy >= 0.77 and s.accuracy_clear == 1.0, s.misses


ROUND5 = Path(__file__).parent / "corpus" / "round5" / "first_look.jsonl"


def score_apart(path, n, rounds):
    """A later round's score, once it is checked to share no item and no source with the gated corpus and the
    rounds before it (a first look is only a first look on text no rule was written from)."""
    items = load_corpus([str(path)])
    earlier = load_corpus(CORPUS + [str(r) for r in rounds])
    assert len(items) == n and not {it["id"] for it in items} & {it["id"] for it in earlier}
    assert not {it["source"] for it in items} & {it["source"] for it in earlier}
    return evaluate(items)


def test_formats_from_the_fifth_corpus_round():
    """The NCCL watchdog thread dying of a CUDA error (the error decides, not the watchdog), the heartbeat monitor's
    "watchdog got stuck" wrapped across lines, HPE's IML machine-check record, an overheating GPU in prose, and an
    ECC Xid's two driver lines (only the second names the unit)."""
    assert cause_of("[rank6]:[E ProcessGroupNCCL.cpp:1182] [Rank 6] NCCL watchdog thread terminated with exception: "
                    "CUDA error: an illegal memory access was encountered") == "software_bug"
    assert cause_of("[Rank 0] NCCL watchdog thread terminated with exception: [Rank 0] Watchdog caught collective "
                    "operation timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE) ran for 600000 milliseconds before timing "
                    "out.") == "nccl_watchdog_timeout"
    assert cause_of("[rank6]:[E429 13:55:49.384372190 ProcessGroupNCCL.cpp:1743] [PG ID 0 PG GUID 0(default_pg) Rank 6]"
                    " ProcessGroupNCCL'\ns watchdog got stuck for 480 seconds without making progress in monitoring "
                    "enqueued collectives.") == "nccl_watchdog_timeout"
    iml = ("Uncorrectable Machine Check Exception (Board 0, Processor 1, APIC ID 0x00000003, Bank 0x00000005, "
           "Status 0x{}'{}, Address 0x00000000'00000000, Misc 0x00000000'00000280)")
    assert cause_of(iml.format("BA000000", "00400405")) == "cpu"  # MCACOD 0x0405: internal error
    assert cause_of(iml.format("BE000000", "0000009F")) == "system_memory"  # MCACOD 0x009f: memory controller
    assert cause_of("It seems to be a overheating problem. After 100 epochs the gpu temperature was 83 °C") == \
        "gpu_thermal_interface_sensor"
    assert cause_of("The CPU fan was loud but the job ran fine; no GPU errors in dmesg") == "unknown"
    pid = "kernel: NVRM: Xid (PCI:0000:4c:00): 94, pid=538574, name=python, channel 0x0000000a"
    unit = "kernel: NVRM: Xid (PCI:0000:4c:00): 94, Contained: SM (0x1). RST: No, D-RST: No"
    assert cause_of(f"{pid}\n{unit}") == cause_of(f"{unit}\n{pid}") == "gpu_sram_memory"
    assert cause_of(pid) == "gpu_hbm3_memory"  # no unit named: a contained ECC error is the DRAM's by default
    # another GPU's unit is not lent: its contained error stays the DRAM's, which outranks the SRAM on one host
    assert cause_of(f"{pid.replace('4c:00', 'cb:00')}\n{unit}") == "gpu_hbm3_memory"


def test_the_fifth_rounds_first_look_set_holds_its_score():
    """33 excerpts gathered Dec 1 (the watchdog's and CUDA's own words, cloud events, Slurm, IPMI, smartctl, prose),
    kept apart from the gated corpus: first look 64 % top-1 (16 of 19 unambiguous), 76 % (19 of 19) after the
    format rules above; its 8 misses are all marked ambiguous."""
    s = score_apart(ROUND5, 33, [ROUND3, ROUND4])
    assert s.accuracy >= 0.75 and s.accuracy_clear == 1.0, s.misses


ROUND6 = Path(__file__).parent / "corpus" / "round6" / "first_look.jsonl"


def test_formats_from_the_sixth_corpus_round():
    """A kernel device's own prefix is not a host ("nvme0: controller is down"), NCCL's IB plugin variants, ranks
    issuing mismatched collectives, the filesystem the job writes to going stale or full, OpenPOWER guard records,
    maintenance and thermal limits in prose; and a PSU named as healthy beside a faulty fan is not a PSU fault."""
    assert cause_of("nvme0: controller is down; will reset: CSTS=0xffffffff, PCI_STATUS=0xffff") == "ssd"
    assert sorted(r.host for r in records(["node-61: eth0: link up", "nvme0: controller is down",
                                           "ata1.00: failed command"], "h")) == ["h", "h", "node-61"]
    assert cause_of("NET/IBP:Got completion from peer 7.6.13.83<36315> with status=12 opcode=32698 len=32696 vendor "
                    "err 129 (Send)") == "network_switch_cable"
    assert cause_of("init.cc:1247 NCCL WARN Mismatched collective detected, please check your collective calls at and "
                    "around rank 39.") == "software_bug"
    assert cause_of("[rank1]: RuntimeError: Detected mismatch between collectives on ranks. Rank 1 is running "
                    "collective: CollectiveFingerPrint(SequenceNumber=3104, OpType=ALLREDUCE)") == "software_bug"
    tb = "Traceback (most recent call last):\n  File \"train.py\", line 9, in save\n    f.write(b)\nOSError: {}"
    assert cause_of(tb.format("[Errno 116] Stale file handle")) == "dependency"  # not the code's bug
    assert cause_of(tb.format("[Errno 28] No space left on device")) == "dependency"
    assert cause_of(tb.format("[Errno 13] Permission denied: '/ckpt'")) == "software_bug"
    # the trainer's note of a save it skipped for a full disk, in a killed rank's log tail, is no failure of its own
    assert cause_of("checkpoint of step 25 failed, skipped (training goes on): [Errno 28] No space left on device") \
        == "unknown"
    assert cause_of(" 00000001 | 90000014 | Fatal      | /Sys0/Node0/DIMM1") == "system_memory"
    assert cause_of(" 00000003 | 9000001e | Predictive | /Sys0/Node0/DIMM5") == "unknown"  # not yet a failure
    assert cause_of(" 00000002 | 90000019 | Fatal      | /Sys0/Node0/Proc1") == "cpu"
    assert cause_of("One of my long running VMs was just rebooted by GCP.") == "host_maintenance"
    assert cause_of("the GPU is at 100% usage, but throttled, and at half power because of the thermal limit") == \
        "gpu_thermal_interface_sensor"
    assert cause_of("Katla has a fault light flashing. Both PSU are good. Most likely cause is a faulty fan.") == \
        "server_chassis"
    assert cause_of("PSU 2 | Failure detected | Asserted") == "power_supply"


def test_the_sixth_rounds_first_look_set_holds_its_score():
    """40 excerpts gathered Dec 1 from sources none of the earlier rounds used, kept apart from the gated corpus:
    first look 62.5 % top-1 (19 of 26 unambiguous), 87.5 % (26 of 26) after the format rules above; its 5 misses
    are all marked ambiguous (one of them a full filesystem quoted in prose, not raised: see StorageUnavailable)."""
    s = score_apart(ROUND6, 40, [ROUND3, ROUND4, ROUND5])
    assert s.accuracy >= 0.875 and s.accuracy_clear == 1.0, s.misses


ROUND7 = Path(__file__).parent / "corpus" / "round7" / "first_look.jsonl"


def test_formats_from_the_seventh_corpus_round():
    """An mlx5 adapter whose firmware never comes up or stops answering the health poll, a spot interruption in a
    cloud agent's words, the powerpc kernel's machine-check oops."""
    assert cause_of("[  121.336005] mlx5_core 0000:03:00.0: mlx5_function_setup:1236:(pid 182): Firmware over 120000 "
                    "MS in pre-initializing state, aborting") == "nic"
    assert cause_of("poll_health:834:(pid 0): device's health compromised - reached miss count") == "nic"
    assert cause_of('{"level":"warn","message":"Spot interruption payload received: {\\"action\\":\\"terminate\\"}"}') \
        == "host_maintenance"
    assert cause_of("Instance is going to be interrupted in 2 minutes. Exiting...") == "host_maintenance"
    assert cause_of("[    0.000000] Oops: Machine check, sig: 7 [#1]") == "cpu"


def test_the_seventh_rounds_first_look_set_holds_its_score():
    """36 excerpts gathered Dec 1, one per source, none used before: first look 72 % top-1, 83 % after the format
    rules above; its 6 misses are all marked ambiguous (two of them on review: their cause is in the thread, not
    the text)."""
    s = score_apart(ROUND7, 36, [ROUND3, ROUND4, ROUND5, ROUND6])
    assert s.accuracy >= 0.83 and s.accuracy_clear == 1.0, s.misses


ROUND8 = Path(__file__).parent / "corpus" / "round8" / "first_look.jsonl"


def test_formats_from_the_eighth_corpus_round():
    """amdgpu's RAS/ACA records (their "[Hardware Error]" and status words are the GPU's, not an x86 machine check),
    a voltage regulator's SEL fault, DCGM's row-remap test failing (in dcgmi diag and in IBM Autopilot's label)."""
    aca = ("[13850.927924] amdgpu 0000:42:00.0: {1}[Hardware Error]: Accelerator Check Architecture events logged\n"
           "[13850.927941] amdgpu 0000:42:00.0: {1}[Hardware Error]: aca entry[00].STATUS=0x98000800003e0000")
    assert cause_of(aca) == "faulty_gpu"
    assert cause_of("amdgpu 0000:1c:00.0: {1}uncorrectable hardware error(ERREVENT_ATHUB_INTERRUPT) detected!") == \
        "faulty_gpu"
    assert cause_of("mce: [Hardware Error]: Machine check events logged\nmce: [Hardware Error]: CPU 3: Machine Check: "
                    "0 Bank 5: be00000000800400") == "cpu"  # the kernel's own MCE still decodes as before
    assert cause_of("SEL Entry: FRU: 1, Sensor: VR_FAULT (0xB1), Event Data: (001A41) PVCCIN_CPU0 status: 0x1a41 "
                    "Assertion") == "power_supply"
    assert cause_of("| Page Retirement/Row Remap | Fail - GPU: 2 |") == "gpu_hbm3_memory"
    assert cause_of("autopilot.ibm.com/dcgm.level.3=ERR_2024-11-04_09.32.03UTC_page_retirement_row_remap.0") == \
        "gpu_hbm3_memory"


def test_the_eighth_rounds_first_look_set_holds_its_score():
    """16 excerpts of tool output gathered Dec 1 (Kubernetes node conditions, amdgpu, BMC SEL, sinfo): first look
    44 % top-1, 62.5 % after the rules above; of its 6 misses one is unambiguous (the device plugin's Xid 999,
    labelled unknown, read as an unlisted Xid on the GPU)."""
    s = score_apart(ROUND8, 16, [ROUND3, ROUND4, ROUND5, ROUND6, ROUND7])
    assert s.accuracy >= 0.62 and s.accuracy_clear >= 0.9, s.misses


ROUND9 = Path(__file__).parent / "corpus" / "round9" / "first_look.jsonl"


def test_formats_from_the_ninth_corpus_round():
    """NCCL's own words for a CUDA allocation out of memory, the driver's reset-required status; and a driver that
    failed is not a failed drive (a fabric-manager or GPU driver message had read as an SSD fault)."""
    assert cause_of("ng30903:3063028:3066152 [3] include/alloc.h:178 NCCL WARN Cuda failure 'out of memory'") == \
        "software_bug"
    assert cause_of("NVRM: nvAssertOkFailedNoLog: Assertion failed: Reset required [NV_ERR_RESET_REQUIRED] (0x00000062) "
                    "returned from status @ kernel_channel.c:2874") == "faulty_gpu"
    assert cause_of("NVIDIA driver failed to load") == "unknown"
    assert cause_of("physicaldrive 1I:1:1 (port 1I:box 1:bay 1, 0 GB): Failed") == "ssd"
    assert cause_of("smartd[811]: Device: /dev/sda [SAT], drive has failed") == "ssd"


def test_the_ninth_rounds_first_look_set_holds_its_score():
    """14 excerpts gathered Dec 1 in 14 minutes, mostly driver and library text: first look 29 % top-1 (4 of 7
    unambiguous), 43 % after the rules above. One unambiguous miss is left: the fabric manager failing on a machine
    without NVSwitches (a setup error) reads as an NVSwitch fault."""
    s = score_apart(ROUND9, 14, [ROUND3, ROUND4, ROUND5, ROUND6, ROUND7, ROUND8])
    assert s.accuracy >= 0.42 and s.accuracy_clear >= 0.8, s.misses
