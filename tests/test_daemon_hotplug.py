"""The daemon outlives its audio devices: unplugged mid-answer and plugged back, ten times.

Real PortAudio streams on the virtual PulseAudio card; "unplugging" unloads the null sink's
module (the microphone is `mic.monitor`, the speaker `spk`), "plugging" loads it again. The
cycles run in a process of their own (`tests/hotplug_cycles.py`): there, resident memory
moves only with what the daemon keeps, not with the rest of the test run's heap.
"""
from __future__ import annotations

import pytest

from tests.pulse_harness import missing_requirement, run_hotplug_cycles

pytestmark = pytest.mark.skipif(missing_requirement() is not None, reason=str(missing_requirement()))

CYCLES = 10


def test_daemon_survives_ten_unplugs_mid_answer(tmp_path, tiny_dir):
    result = run_hotplug_cycles("daemon", tmp_path, cycles=CYCLES)
    assert result["loop_ended"]
    assert result["device_losses"] == CYCLES and result["recoveries"] == 0
    assert result["loss_warnings"] == CYCLES  # one warning per loss
    assert result["turns_answered"] >= CYCLES
    assert max(result["back_s"]) < 2.0, result["back_s"]
    sizes = result["sizes"]
    # no thread or descriptor per re-open
    assert {(s["threads"], s["fds"]) for s in sizes[1:]} == {(sizes[-1]["threads"], sizes[-1]["fds"])}, sizes
    # A leak grows every cycle; one-off allocations (the allocator keeping a longer answer's
    # buffers, or handing them back) do not. Resident size moved by up to +-10 MB in one cycle
    # here, either way, so each end is the median of three cycles: cycles 3-5 against the last
    # three (4 cycles apart) may differ by less than 8 MB, i.e. a leak of 2 MB per cycle fails.
    kb = [s["rss_kb"] for s in sizes]
    assert sorted(kb[-3:])[1] - sorted(kb[3:6])[1] < 8_192, kb
