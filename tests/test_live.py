"""The live loop: frames from a connection continue a session's stream, one answer each."""

import io
import re
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import streamv2v.live as live_module
from streamv2v.bank import BankConfig
from streamv2v.errors import StreamV2VError
from streamv2v.live import LiveLoop, LiveRecording, decode_image, encode_jpeg
from streamv2v.session import Session
from streamv2v.stream import StreamConfig
from streamv2v.video import VideoReader

TIMEOUT = 60.0
ANSWERS = ("size", "error")  # the messages that answer a frame, besides the image


def frames(count, width=32, height=24, seed=0):
    """uint8 camera frames that move a little from one to the next."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(height, width, 3, generator=g)
    return [((base + 0.05 * i) % 1 * 255).round().to(torch.uint8) for i in range(count)]


def png(frame: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


class Answers:
    """What a loop sends, as a connection would receive it."""

    def __init__(self) -> None:
        self.messages: list = []
        self.changed = threading.Condition()

    def __call__(self, message) -> None:
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    def answers(self) -> list:
        """The answers to frames: images, size notes and errors, not status or recording lines."""
        return [m for m in self.messages if not isinstance(m, dict) or m["type"] in ANSWERS]

    def wait(self, count: int) -> list:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.answers()) >= count, TIMEOUT), (
                self.messages
            )
        return self.answers()


def started(model, name="live", frame=None) -> Session:
    """A session after one queued run (a webcam frame), as a live camera finds it."""
    session = Session(name)
    first = frames(1, seed=9)[0] if frame is None else frame
    session.run(model, StreamConfig(), BankConfig(), "a painting", "", first[None])
    return session


def test_live_frames_continue_the_last_runs_stream(tiny_model_taesd):
    """Each frame gets its restyled frame back, in order, exactly what a queued run per frame
    gives (a second session run the slow way), and the bank goes on filling."""
    camera = frames(6)
    reference = started(tiny_model_taesd, "reference")
    expected = [
        encode_jpeg(reference.run(*reference.settings[:5], frame[None])[0]) for frame in camera
    ]
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers, describe=lambda: "bank text")
    for frame in camera:
        loop.offer(png(frame))
        answers.wait(loop.frames_out + 1)  # one in flight at a time, as the browser may
    loop.close()
    loop.join(TIMEOUT)
    assert answers.answers() == expected
    assert session.stream._next_index == 7
    assert session.mode == "live"
    assert not loop._thread.is_alive()


def test_a_frame_of_another_size_is_answered_with_the_streams_size(tiny_model_taesd):
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers)
    loop.offer(png(frames(1, width=40, height=24)[0]))
    loop.offer(png(frames(1)[0]))
    first, second = answers.wait(2)
    assert first == {"type": "size", "width": 32, "height": 24}
    assert decode_image(second).shape == (24, 32, 3)
    assert not loop.closed  # the sender scales its frames and goes on
    loop.close()


def test_status_comes_with_the_frame_rate_and_the_banks_text(tiny_model_taesd, monkeypatch):
    monkeypatch.setattr(live_module, "STATUS_EVERY_S", 0.0)
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers, describe=lambda: "bank 'live': 2 updates")
    loop.offer(png(frames(1)[0]))
    answers.wait(1)
    loop.close()
    loop.join(TIMEOUT)
    status = [m for m in answers.messages if isinstance(m, dict) and m["type"] == "status"]
    assert status[-1]["text"] == "bank 'live': 2 updates"
    assert status[-1]["fps"] > 0


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not an image", r"a live frame of 12 bytes is not an image .*: send JPEG or PNG frames"),
        ("no run", r"bank 'live' has no stream to continue .*: run the workflow once, then go .*"),
        ("released", r"bank 'live' has no stream to continue \(.* model was released\).*"),
    ],
)
def test_a_failing_frame_ends_the_loop_with_its_message(tiny_model_taesd, case, message):
    session = Session("live") if case == "no run" else started(tiny_model_taesd)
    if case == "released":
        session.release()  # Unload Models, or Free Memory, between two frames
    answers = Answers()
    loop = LiveLoop(session, answers)
    loop.offer(b"not a jpeg.." if case == "not an image" else png(frames(1)[0]))
    (error,) = answers.wait(1)
    assert error["type"] == "error"
    assert re.fullmatch(message, error["text"]), error["text"]
    loop.join(TIMEOUT)
    assert loop.closed and not loop._thread.is_alive()
    loop.offer(png(frames(1)[0]))  # a frame after the end is dropped, not queued
    assert loop._frames.qsize() == 0


def test_a_sender_that_does_not_wait_for_answers_is_stopped(monkeypatch):
    """Frames beyond the few a sender may keep in flight would only age in the queue."""
    session = Session("live")
    running = threading.Event()
    release = threading.Event()

    def slow(frame, on_status=None):
        running.set()
        release.wait(TIMEOUT)
        return torch.zeros(24, 32, 3)

    monkeypatch.setattr(session, "run_live", slow)
    answers = Answers()
    loop = LiveLoop(session, answers)
    data = png(frames(1)[0])
    loop.offer(data)
    assert running.wait(TIMEOUT)
    for _ in range(live_module.MAX_WAITING + 1):
        loop.offer(data)
    release.set()
    loop.join(TIMEOUT)
    errors = [m for m in answers.messages if isinstance(m, dict) and m["type"] == "error"]
    assert errors == [
        {
            "type": "error",
            "text": "4 live frames were waiting: a sender keeps at most two frames without an "
            "answer",
        }
    ]
    assert loop.closed


def blocked_in(thread: threading.Thread, name: str, on=None) -> None:
    """Wait until ``thread``'s stack has a frame of function ``name`` (a method of ``on``)."""
    for _ in range(int(TIMEOUT / 0.01)):
        frame = sys._current_frames().get(thread.ident)
        while frame is not None:
            if frame.f_code.co_name == name and (on is None or frame.f_locals.get("self") is on):
                return
            frame = frame.f_back
        time.sleep(0.01)
    raise AssertionError(f"never reached {name}")


def test_a_live_frame_goes_on_from_a_queued_run_that_came_first(tiny_model_taesd):
    """A run queued meanwhile (the user changed the prompt and pressed Run) holds the session
    while a live frame waits: the frame goes on with that run's settings, never back to the
    ones it would have read before waiting."""
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers)
    with session._busy:  # the queued run
        loop.offer(png(frames(1)[0]))
        blocked_in(loop._thread, "_held", on=session)  # the frame waits for the session
        session.settings = session.settings._replace(prompt="a NEW prompt")
    answers.wait(1)
    loop.close()
    assert session.settings.prompt == session.stream.prompt == "a NEW prompt"


def test_a_release_waits_for_the_live_frame_and_is_not_undone(tiny_model_taesd):
    """Unload Models while a live frame runs: the release waits for it (the model is in use
    until then), and the stream does not come back with the released model afterwards."""
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers)
    with session._busy:  # a live frame about to run, a release asked for meanwhile
        loop.offer(png(frames(1)[0]))
        blocked_in(loop._thread, "_held", on=session)  # the frame waits for the session
        release = threading.Thread(target=session.release)
        release.start()
        time.sleep(0.2)
        assert release.is_alive()  # waiting its turn
    release.join(TIMEOUT)
    answers.wait(1)  # the frame ran before the release took its turn, or came after it
    if not loop.closed:
        loop.offer(png(frames(1)[0]))
        answers.wait(2)
    loop.join(TIMEOUT)
    assert session.settings is None and session.stream is None
    assert answers.answers()[-1]["type"] == "error"  # the frame after the release


def test_a_failed_live_frame_leaves_the_stream_and_the_settings_as_they_were(
    tiny_model_taesd, monkeypatch
):
    session = started(tiny_model_taesd)
    settings, stream, index = session.settings, session.stream, session.stream._next_index
    monkeypatch.setattr(stream, "_push", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        session.run_live(frames(1)[0])
    assert session.settings is settings
    assert session.stream is stream and stream._next_index == index


def test_images_round_trip_through_the_codecs():
    frame = frames(1)[0]
    assert torch.equal(decode_image(png(frame)), frame)
    rgba = Image.fromarray(np.dstack([frame.numpy(), np.full((24, 32), 255, np.uint8)]))
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    assert torch.equal(decode_image(buffer.getvalue()), frame)  # alpha dropped
    ramp = torch.linspace(0, 1, 32)
    smooth = torch.stack(
        [ramp.expand(24, 32), ramp.flip(0).expand(24, 32), torch.full((24, 32), 0.5)], -1
    )
    jpeg = encode_jpeg(smooth)
    assert jpeg[:2] == b"\xff\xd8"  # a JPEG, as small as the browser can draw at once
    assert (decode_image(jpeg).float() / 255 - smooth).abs().max() < 0.05
    with pytest.raises(StreamV2VError, match="not an image"):
        decode_image(b"")


def messages_of(answers: Answers, kind: str) -> list[dict]:
    return [m for m in answers.messages if isinstance(m, dict) and m["type"] == kind]


def wait_for(answers: Answers, kind: str) -> dict:
    with answers.changed:
        assert answers.changed.wait_for(lambda: messages_of(answers, kind), TIMEOUT), (
            answers.messages
        )
    return messages_of(answers, kind)[0]


def test_a_recording_keeps_the_live_frames_at_the_times_they_came(tiny_model_taesd, tmp_path):
    """What the camera showed, in a video file: the frames sent back, timed by the clock (a
    pause in the live frames is a pause in the video), started and stopped while live."""
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers)
    camera = frames(8)
    loop.offer(png(camera[0]))  # before the recording: not in it
    answers.wait(1)
    path = tmp_path / "out" / "live.mp4"
    loop.record(path)
    for index, frame in enumerate(camera[1:6]):
        if index == 3:
            time.sleep(0.5)
        loop.offer(png(frame))
        answers.wait(loop.frames_out + 1)
    loop.record(None)
    loop.offer(png(camera[6]))  # after it: not in it
    answers.wait(7)
    loop.close()
    loop.join(TIMEOUT)
    assert wait_for(answers, "recording") == {"type": "recording", "file": str(path)}
    recorded = wait_for(answers, "recorded")
    assert recorded["file"] == str(path) and recorded["frames"] == 5
    assert recorded["dropped"] == 0 and recorded["error"] is None
    with VideoReader(path) as video:
        kept = list(video)
        times = [float(t) for t in video.times]
    assert len(kept) == 5 and kept[0].shape == (24, 32, 3)
    sent = [decode_image(m).numpy() for m in answers.answers() if isinstance(m, bytes)][1:6]
    for got, want in zip(kept, sent):  # two lossy codecs apart
        assert np.abs(got.astype(float) - want.astype(float)).mean() < 12
    gaps = np.diff(times)
    assert gaps[2] > 0.45 and max(gaps[:2]) < gaps[2] and gaps[3] < gaps[2]
    assert recorded["seconds"] == pytest.approx(times[-1], abs=0.01)


def test_a_recording_ends_with_the_loop_and_an_empty_one_leaves_no_file(tiny_model_taesd, tmp_path):
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers)
    loop.record(tmp_path / "empty.mp4")
    loop.record(tmp_path / "second.mp4")  # a new recording ends the one before
    loop.offer(png(frames(1)[0]))
    answers.wait(1)
    loop.close()  # the page went away while recording
    loop.join(TIMEOUT)
    empty, second = messages_of(answers, "recorded")
    assert empty["file"] is None and empty["frames"] == 0
    assert not (tmp_path / "empty.mp4").exists()
    assert second["file"] == str(tmp_path / "second.mp4") and second["frames"] == 1
    with VideoReader(tmp_path / "second.mp4") as video:
        assert len(list(video)) == 1


def test_a_recording_stops_when_a_run_changes_the_frame_size(tmp_path):
    recording = LiveRecording(tmp_path / "sized.mp4")
    recording.add(np.zeros((24, 32, 3), np.uint8), 10.0)
    recording.add(np.zeros((48, 64, 3), np.uint8), 10.1)
    recording.add(np.zeros((24, 32, 3), np.uint8), 10.2)  # after the error: left out
    recorded = recording.stop()
    assert recorded["frames"] == 1
    assert re.fullmatch(
        r"the recording stopped at 64x48 frames: a run changed the stream's size from 32x24; "
        r"press Record again for a file of the new size",
        recorded["error"],
    )
    with VideoReader(tmp_path / "sized.mp4") as video:
        assert len(list(video)) == 1  # what came before is kept, playable


def test_a_recording_that_falls_behind_leaves_frames_out_and_counts_them(tmp_path, monkeypatch):
    """The encoder must never hold the live frames up: past its backlog, frames are left out."""
    monkeypatch.setattr(live_module, "RECORD_BACKLOG", 2)
    release = threading.Event()
    recording = LiveRecording(tmp_path / "slow.mp4")
    write = recording._write
    monkeypatch.setattr(recording, "_write", lambda *a: (release.wait(TIMEOUT), write(*a)))
    start = time.monotonic()
    for index in range(6):
        recording.add(np.zeros((24, 32, 3), np.uint8), 10.0 + index / 30)
    assert time.monotonic() - start < 1.0  # never waited for the encoder
    release.set()
    recorded = recording.stop()
    assert recorded["dropped"] >= 3 and recorded["frames"] + recorded["dropped"] == 6


def test_a_recording_is_summed_up_before_the_error_that_ends_the_loop(tiny_model_taesd, tmp_path):
    """The connection closes after an error: what was recorded is said first."""
    session = started(tiny_model_taesd)
    answers = Answers()
    loop = LiveLoop(session, answers)
    loop.record(tmp_path / "kept.mp4")
    loop.offer(png(frames(1)[0]))
    answers.wait(1)
    session.release()  # Unload Models while recording
    loop.offer(png(frames(1)[0]))
    answers.wait(2)
    loop.join(TIMEOUT)
    kinds = [m["type"] for m in answers.messages if isinstance(m, dict) and m["type"] != "status"]
    assert kinds == ["recording", "recorded", "error"]
    assert messages_of(answers, "recorded")[0]["frames"] == 1


def test_a_recording_that_fails_says_so_while_live(tmp_path, monkeypatch):
    """A run that changes the frame size ends the recording then, not when the user stops."""
    session = Session("live")
    sizes = iter([(24, 32)] + [(48, 64)] * 50)
    monkeypatch.setattr(
        session, "run_live", lambda frame, on_status=None: torch.zeros(*next(sizes), 3)
    )
    answers = Answers()
    loop = LiveLoop(session, answers)
    loop.record(tmp_path / "sized.mp4")
    for count in range(1, 50):
        loop.offer(png(frames(1)[0]))
        answers.wait(count)
        if messages_of(answers, "recorded"):
            break
    loop.close()
    (recorded,) = messages_of(answers, "recorded")
    assert recorded["frames"] == 1 and "a run changed the stream's size" in recorded["error"]
    assert loop.frames_out == count  # the live frames went on
