"""Daemon turn-taking and barge-in with a fake duplex device, a scripted dialogue and a fake clock."""
from __future__ import annotations

import dataclasses

from assistant.daemon import Daemon
from assistant.daemon_config import DaemonSettings, DialogueSettings, TurnEnd, VadSettings
from assistant.dialogue import Decision
from tests.fakes import (
    BLOCK_SAMPLES_24K,
    FakeClock,
    FakeDuplex,
    LevelGate,
    BargeInAllowed,
    ScriptedConversation,
    silence_chunks,
    speech_chunks,
)

SETTINGS = DaemonSettings(vad=VadSettings(preroll_ms=320))


def _daemon(mic, script, settings=SETTINGS, **conv_kwargs):
    clock = FakeClock()
    audio = FakeDuplex(clock, mic)
    conv = ScriptedConversation(script=script, **conv_kwargs)
    daemon = Daemon(conv, audio, LevelGate(), BargeInAllowed(), settings, clock)
    return daemon, conv, audio, clock


def _run(daemon, ticks: int) -> None:
    for _ in range(ticks):
        daemon.tick()


def test_turn_taking_answers_and_reports_latencies():
    mic = silence_chunks(4) + speech_chunks(6) + silence_chunks(40)
    daemon, conv, audio, _ = _daemon(mic, [(Decision.RESPOND, 5)], speech_tokens=40)
    _run(daemon, 50)
    names = conv.names()
    # pre-roll chunks are fed with decisions ignored, then followed chunks until the decision
    assert names.count("start_answer") == 1
    assert conv.calls[:2] == [("listen", False), ("listen", False)]
    assert audio.played == 40 * 600, "the whole answer reached the speaker"
    assert daemon.counters.turns_answered == 1
    record = daemon.turn_log[0]
    assert record["decision_to_first_pcm_ms"] is not None and record["decision_to_first_played_ms"] >= 0


def test_barge_in_flushes_within_one_block_and_commits_played_audio():
    mic = speech_chunks(3) + silence_chunks(6) + speech_chunks(4) + silence_chunks(30)
    script = [(Decision.RESPOND, 2), (Decision.RESPOND, 3)]
    daemon, conv, audio, clock = _daemon(mic, script, speech_tokens=400)
    decision_at = None
    for _ in range(45):
        daemon.tick()
        if decision_at is None and ("commit_barge_in" in conv.names()):
            decision_at = clock.now
            played_at_decision = audio.played
    assert decision_at is not None, "the second utterance interrupted the answer"
    assert audio.flushes and audio.flushes[0] == decision_at
    commit = next(c for c in conv.calls if c[0] == "commit_barge_in")
    assert 0 < commit[1] <= played_at_decision
    # After the cut only the new answer plays: the old one's queued audio never reaches the speaker.
    assert conv.names().count("start_answer") == 2
    old_answer_played = commit[1]
    assert old_answer_played <= played_at_decision + BLOCK_SAMPLES_24K
    assert daemon.counters.barge_ins == 1


def test_ignored_interruption_lets_the_answer_continue():
    mic = speech_chunks(3) + silence_chunks(4) + speech_chunks(3) + silence_chunks(60)
    script = [(Decision.RESPOND, 2), (Decision.IGNORE, 2)]
    daemon, conv, audio, _ = _daemon(mic, script, speech_tokens=200)
    _run(daemon, 70)
    assert "drop_barge_in" in conv.names() and "commit_barge_in" not in conv.names()
    assert audio.flushes == [] and audio.played == 200 * 600, "the answer played to its end"
    assert daemon.counters.ignored_interruptions == 1


def test_undecided_turn_is_closed_but_not_lost():
    mic = speech_chunks(3) + silence_chunks(30)
    daemon, conv, _, _ = _daemon(mic, [(Decision.RESPOND, 99)])
    _run(daemon, 30)
    assert "close_ignored_turn" in conv.names() and "start_answer" not in conv.names()
    assert daemon.counters.turns_ignored == 1


def test_vad_turn_end_answers_at_silence():
    settings = dataclasses.replace(SETTINGS, dialogue=DialogueSettings(turn_end=TurnEnd.VAD))
    mic = speech_chunks(3) + silence_chunks(30)
    daemon, conv, audio, _ = _daemon(mic, [(Decision.IGNORE, 1)], settings=settings, speech_tokens=10)
    _run(daemon, 30)
    assert conv.names().count("start_answer") == 1
    assert all(not c[1] for c in conv.calls if c[0] == "listen"), "decisions are not followed"
    assert audio.played == 10 * 600


def test_lost_device_is_reopened_and_the_answer_is_cut():
    mic = speech_chunks(3) + silence_chunks(40)
    daemon, conv, audio, clock = _daemon(mic, [(Decision.RESPOND, 2)], speech_tokens=400)
    _run(daemon, 8)
    audio.healthy = False
    audio.fail_reopen_until = clock.now + 1.0
    for _ in range(30):
        clock.now += 0.1
        daemon.tick()
    assert daemon.counters.device_losses == 1
    assert "cut_answer" in conv.names()
    assert audio.healthy and 2 <= audio.reopen_calls <= 8


def test_idle_timeout_forgets_the_dialogue():
    settings = dataclasses.replace(SETTINGS, dialogue=DialogueSettings(idle_timeout_s=2.0))
    daemon, conv, _, _ = _daemon(silence_chunks(30), [])
    daemon.settings = settings
    _run(daemon, 20)
    assert "reset" in conv.names()


def test_a_short_pause_does_not_end_the_turn():
    # 3 quiet chunks make the gate stop; 0.8 s of pause is shorter than silence_end_s (2 s).
    mic = speech_chunks(3) + silence_chunks(5) + speech_chunks(4) + silence_chunks(30)
    daemon, conv, _, _ = _daemon(mic, [(Decision.RESPOND, 11)], speech_tokens=10)
    _run(daemon, 40)
    assert "close_ignored_turn" not in conv.names()
    assert conv.names().count("start_answer") == 1


def test_a_failing_step_is_logged_and_the_dialogue_restarts(caplog):
    mic = speech_chunks(3) + silence_chunks(10)
    daemon, conv, audio, _ = _daemon(mic, [(Decision.RESPOND, 2)], speech_tokens=40)

    def broken_step():
        raise RuntimeError("decoder exploded")

    conv.answer_step = broken_step
    ticks = iter(range(12))
    daemon.run(lambda: next(ticks, None) is None)
    assert daemon.counters.recoveries >= 1 and "reset" in conv.names()
    assert "decoder exploded" in caplog.text


def test_file_turn_end_is_refused_for_live_audio():
    import pytest

    with pytest.raises(ValueError, match="turn_end=file"):
        DaemonSettings(dialogue=DialogueSettings(turn_end=TurnEnd.FILE))


def test_a_blip_while_speaking_never_cuts_the_answer_in_vad_mode():
    """A 160 ms burst (residual echo, a click) followed by the VAD's hangover is shorter than
    min_barge_in_ms of *speech*: the answer plays on. A real interruption (4 chunks) cuts it."""
    settings = dataclasses.replace(SETTINGS,
                                   dialogue=DialogueSettings(turn_end=TurnEnd.VAD, min_barge_in_ms=400))
    # the interruption comes ~1.9 s into the answer, after the AEC warm-up hold-off
    blip = speech_chunks(3) + silence_chunks(12) + speech_chunks(1) + silence_chunks(60)
    daemon, conv, audio, _ = _daemon(blip, [], settings=settings, speech_tokens=200)
    daemon.settings = settings
    _run(daemon, 70)
    assert "commit_barge_in" not in conv.names() and audio.flushes == []
    assert daemon.counters.ignored_interruptions == 1 and audio.played == 200 * 600

    real = speech_chunks(3) + silence_chunks(12) + speech_chunks(4) + silence_chunks(60)
    daemon, conv, audio, _ = _daemon(real, [], settings=settings, speech_tokens=200)
    _run(daemon, 70)
    assert "commit_barge_in" in conv.names() and daemon.counters.barge_ins == 1


class BargeInAfter:
    """Barge-in allowed only from `at_s` on (echo control still adapting before)."""

    def __init__(self, clock: FakeClock, at_s: float) -> None:
        self.clock, self.at_s = clock, at_s

    @property
    def allows_barge_in(self) -> bool:
        return self.clock.now >= self.at_s


def _daemon_with_warmup(mic, script, warmup_until_s: float):
    daemon, conv, audio, clock = _daemon(mic, script, speech_tokens=400)
    daemon.barge_in = BargeInAfter(clock, warmup_until_s)
    return daemon, conv, audio, clock


def test_a_user_who_starts_talking_during_the_aec_warmup_still_cuts_in_after_it():
    """The gate reports a start only once: speech begun while barge-in is not yet allowed opens
    the turn as soon as it is, if the user is still talking (it was lost before, and a 2 s
    question over the answer never cut in)."""
    # answer from ~1.0 s; the interruption speaks from 1.44 s to 3.2 s; barge-in allowed from 2.2 s
    mic = speech_chunks(3) + silence_chunks(6) + speech_chunks(11) + silence_chunks(30)
    daemon, conv, audio, clock = _daemon_with_warmup(mic, [(Decision.RESPOND, 2), (Decision.RESPOND, 3)], 2.2)
    opened_at = None
    for _ in range(50):
        daemon.tick()
        if opened_at is None and daemon.counters.interruptions_heard:
            opened_at = clock.now
    assert opened_at is not None and 2.2 <= opened_at < 2.2 + 0.16 + 1e-9, "heard when allowed, not later"
    assert daemon.counters.barge_ins == 1 and "commit_barge_in" in conv.names()


def test_speech_that_ends_inside_the_warmup_opens_no_turn():
    """Echo residue while AEC adapts (speech that stops before barge-in is allowed) is dropped,
    and a later quiet stretch does not revive it."""
    mic = speech_chunks(3) + silence_chunks(6) + speech_chunks(2) + silence_chunks(40)
    daemon, conv, audio, _ = _daemon_with_warmup(mic, [(Decision.RESPOND, 2), (Decision.RESPOND, 1)], 2.5)
    _run(daemon, 50)
    assert daemon.counters.interruptions_heard == 0 and daemon.counters.barge_ins == 0
    assert audio.flushes == [] and "begin_barge_in" not in conv.names()
