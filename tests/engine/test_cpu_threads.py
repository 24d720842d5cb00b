"""The engine's CPU thread count follows the cores other processes leave free (engine/cpu_threads.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from leapllm.config import EngineConfig
from leapllm.engine.cpu_threads import FreeCoreThreads, busy_seconds


class FakeMachine:
    """A clock, this process's CPU time and every core's busy time, advanced by hand."""

    def __init__(self):
        self.now = self.own = self.busy = 0.0
        self.set_to: list[int] = []

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now += seconds
        self.own += seconds * own_cores
        self.busy += seconds * (own_cores + other_cores)

    def threads(self, cores: int, max_threads: int) -> FreeCoreThreads:
        return FreeCoreThreads(max_threads, interval_s=0.25, cpus=set(range(cores)), read_busy=lambda: self.busy,
                               clock=lambda: self.now, own_cpu=lambda: self.own, set_threads=self.set_to.append)


def test_a_busy_process_beside_the_engine_takes_its_core_away_once_two_readings_agree():
    m = FakeMachine()
    threads = m.threads(cores=2, max_threads=2)
    m.run(0.3, own_cores=2.0, other_cores=0.0)
    assert threads.update() == 2 and m.set_to == []
    # A busy loop appears: the OS splits 2 cores among 3 busy threads.
    m.run(0.3, own_cores=1.33, other_cores=0.67)
    assert threads.update() == 2  # one reading could be a burst
    assert threads.others_cores == pytest.approx(0.67)
    m.run(0.3, own_cores=1.33, other_cores=0.67)
    assert threads.update() == 1 and m.set_to == [1]
    m.run(0.3, own_cores=1.0, other_cores=1.0)
    assert threads.update() == 1 and m.set_to == [1]


def test_a_burst_elsewhere_changes_nothing():
    m = FakeMachine()
    threads = m.threads(cores=2, max_threads=2)
    for others in (0.0, 1.5, 0.0, 1.5, 0.1):
        m.run(0.3, own_cores=2.0 - others / 2, other_cores=others)
        assert threads.update() == 2
    assert m.set_to == []


def test_threads_come_back_after_two_readings_without_the_busy_process():
    m = FakeMachine()
    threads = m.threads(cores=4, max_threads=4)
    for _ in range(2):
        m.run(0.3, own_cores=2.0, other_cores=2.0)
        threads.update()
    assert threads.threads == 2
    m.run(0.3, own_cores=2.0, other_cores=0.0)
    assert threads.update() == 2  # one quiet reading is not enough
    m.run(0.3, own_cores=2.0, other_cores=0.0)
    assert threads.update() == 4 and m.set_to == [2, 4]


def test_light_use_by_others_keeps_every_thread_and_the_count_never_exceeds_the_maximum():
    m = FakeMachine()
    threads = m.threads(cores=8, max_threads=4)
    for _ in range(4):
        m.run(0.3, own_cores=4.0, other_cores=0.3)  # a load generator, a shell: not a core's worth
        assert threads.update() == 4
    for _ in range(2):
        m.run(0.3, own_cores=1.0, other_cores=7.0)
        threads.update()
    assert threads.threads == 1 and m.set_to == [1]  # never below one


def test_readings_are_at_most_one_per_interval_and_an_idle_gap_is_not_read():
    m = FakeMachine()
    threads = m.threads(cores=2, max_threads=2)
    m.run(0.1, own_cores=1.0, other_cores=1.0)
    assert threads.update() == 2 and threads.others_cores == 0.0  # too soon to read
    # The engine idles for 10 s while another process runs: that says nothing about the next steps.
    m.run(10.0, own_cores=0.0, other_cores=2.0)
    threads.update()
    assert threads.others_cores == 0.0
    for _ in range(2):
        m.run(0.3, own_cores=1.0, other_cores=1.0)
        threads.update()
    assert threads.threads == 1


def test_without_proc_stat_or_with_one_thread_nothing_is_changed(tmp_path):
    m = FakeMachine()
    unreadable = FreeCoreThreads(2, cpus={0, 1}, read_busy=lambda: None, set_threads=m.set_to.append)
    assert not unreadable.enabled and unreadable.update() == 2
    single = m.threads(cores=2, max_threads=1)
    m.run(1.0, own_cores=0.0, other_cores=2.0)
    assert not single.enabled and single.update() == 1 and m.set_to == []
    assert busy_seconds({0}, str(tmp_path / "no-stat")) is None
    (tmp_path / "stat").write_text("cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 10 0 10 100 5 1 1 0 0 0\n")
    assert busy_seconds({0}, str(tmp_path / "stat")) == pytest.approx(22 / os.sysconf("SC_CLK_TCK"))
    assert busy_seconds({3}, str(tmp_path / "stat")) is None  # not a core of this machine's listing


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux's /proc/stat and two cores")
def test_a_real_busy_loop_is_counted_as_another_process():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        threads = FreeCoreThreads(2, interval_s=0.2, set_threads=lambda n: None)  # the window starts
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.6:  # our own work meanwhile
            pass
        threads.update()
        assert threads.others_cores > 0.5, threads.others_cores  # the loop had a core's share at least
    finally:
        busy.kill()
        busy.wait()


def test_the_engine_follows_free_cores_on_cpu_unless_told_not_to(llm):
    from leapllm.engine.llm_engine import LLMEngine

    engine = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=8))
    assert engine.cpu_threads is not None and engine.cpu_threads.max_threads == torch.get_num_threads()
    fixed = LLMEngine(llm.model, llm.tokenizer, EngineConfig(num_blocks=8, follow_free_cores=False))
    assert fixed.cpu_threads is None
