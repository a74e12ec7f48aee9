"""Threads: hooks act only on the call that installed them (README, "Threads").

Back-patched calls (several presets, contrastive decoding included), ``disabled()`` calls and raw calls of the
base model (``model.generate`` and forward, from threads that never touched backpatch) run at once on one tiny
model, started together by a barrier, many rounds. Every answer must equal the sequential one, no call may
raise, and no hook may be left after a round. The failures are collected over all rounds, so a failing run says
how many rounds went wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from tiny import collate, make_row, tiny_qwen2_audio
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import backpatch
from backpatch import Contrastive, Patch, Preset

ROUNDS = 30
GEN = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True)

PRESETS = {
    "add": Preset(patches=[Patch(source=-2, target=1, scale=0.7, mode="add", positions="audio")]),
    "replace": Preset(patches=[Patch(source=-1, target=0, scale=1.0, mode="replace", positions="last")]),
    "interpolate": Preset(patches=[Patch(source=4, target=2, scale=0.5, mode="interpolate", positions="audio+last"),
                                   Patch(source=3, target=0, scale=0.8, mode="add")]),
    "contrastive": Preset(patches=[Patch(source=-1, target=0, scale=1.5, positions="audio+last")],
                          contrastive=Contrastive(alpha=1.0, null_audio="zeros")),
}

# Batches of different shapes, so that a hook that reaches the wrong call shows up as an error or a new answer.
BATCHES = [
    collate([make_row(0, 40), make_row(1, 30)]),
    collate([make_row(2, 36)]),
    collate([make_row(3, 40), make_row(4, None), make_row(5, 24, text_len=8)]),
    collate([make_row(6, 32, text_len=3)]),
    collate([make_row(7, 40), make_row(8, 28)]),
]


@dataclass
class Job:
    name: str
    run: Callable[[], tuple[torch.Tensor | None, list[torch.Tensor]]]


def _generated(out) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return out.sequences, list(out.logits)


def _forward(module, batch) -> tuple[None, list[torch.Tensor]]:
    with torch.no_grad():
        return None, [module(**batch).logits]


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Python threads are what this file is about; torch's own intra-op threads only make it slow on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def model():
    return tiny_qwen2_audio()  # a fresh model per test: a hook left behind cannot leak into the next test


@pytest.fixture
def wrappers(model):
    return {name: backpatch.wrap(model, preset) for name, preset in PRESETS.items()}


def mixed_jobs(model, wrappers) -> list[Job]:
    """Three back-patching presets and a contrastive one, a patched forward, a disabled() call, and raw calls."""
    b = BATCHES

    def disabled():
        with wrappers["contrastive"].disabled():
            return _generated(wrappers["contrastive"].generate(**b[4], **GEN))

    return [
        Job("add", lambda: _generated(wrappers["add"].generate(**b[0], **GEN))),
        Job("replace", lambda: _generated(wrappers["replace"].generate(**b[2], **GEN))),
        Job("interpolate", lambda: _generated(wrappers["interpolate"].generate(**b[1], **GEN))),
        Job("contrastive", lambda: _generated(wrappers["contrastive"].generate(**b[3], **GEN))),
        Job("patched forward", lambda: _forward(wrappers["add"], b[2])),
        Job("disabled", disabled),
        Job("raw generate", lambda: _generated(model.generate(**b[1], **GEN))),
        Job("raw forward", lambda: _forward(model, b[0])),
    ]


def run_together(jobs: list[Job]) -> list:
    """Run every job in its own thread, released at once by a barrier; a job's result or its exception."""
    barrier = threading.Barrier(len(jobs), timeout=60)
    results: list = [None] * len(jobs)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results[i] = jobs[i].run()
        except BaseException as exc:  # KeyboardInterrupt too: reported with the results, not raised here
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hangs (deadlock?)"
    return results


def difference(name: str, got, want) -> str | None:
    """Why ``got`` is not the sequential answer ``want`` (None when it is)."""
    if isinstance(got, BaseException):
        return f"{name}: {type(got).__name__}: {str(got)[:120]}"
    sequences, logits = got
    if want[0] is not None and not torch.equal(sequences, want[0]):
        return f"{name}: other tokens"
    if len(logits) != len(want[1]):
        return f"{name}: {len(logits)} logit steps instead of {len(want[1])}"
    for a, b in zip(logits, want[1], strict=True):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
            return f"{name}: other logits"
    return None


def check_rounds(model, jobs: list[Job], rounds: int, extra_check: Callable[[], str | None] = lambda: None) -> None:
    expected = [job.run() for job in jobs]
    bad_rounds: list[list[str]] = []
    for _ in range(rounds):
        results = run_together(jobs)
        problems = [p for job, got, want in zip(jobs, results, expected, strict=True)
                    if (p := difference(job.name, got, want))]
        if (left := backpatch.backpatch_hook_count(model)) != 0:
            problems.append(f"{left} hooks left")
        if (extra := extra_check()) is not None:
            problems.append(extra)
        if problems:
            bad_rounds.append(problems)
    assert not bad_rounds, (f"{len(bad_rounds)} of {rounds} rounds differ from the sequential answers; "
                            f"first: {bad_rounds[0]}; last: {bad_rounds[-1]}")


def test_patched_disabled_and_raw_calls_from_many_threads_give_the_sequential_answers(model, wrappers):
    jobs = mixed_jobs(model, wrappers)
    check_rounds(model, jobs, ROUNDS)
    for wrapped in wrappers.values():
        assert wrapped.unwrap() is model


def test_apply_blocks_in_several_threads_neither_mix_nor_leave_generate_behind(model, wrappers):
    """``apply()`` replaces ``model.generate`` in place: its blocks serialize instead of overwriting each other."""

    def inside_apply(name: str, batch: dict):
        def run():
            with backpatch.apply(model, PRESETS[name]):
                return _generated(model.generate(**batch, **GEN))

        return run

    def disabled():
        with wrappers["add"].disabled():
            return _generated(wrappers["add"].generate(**BATCHES[1], **GEN))

    jobs = [
        Job("apply add", inside_apply("add", BATCHES[0])),
        Job("apply interpolate", inside_apply("interpolate", BATCHES[2])),
        Job("apply contrastive", inside_apply("contrastive", BATCHES[3])),
        Job("replace", lambda: _generated(wrappers["replace"].generate(**BATCHES[4], **GEN))),
        Job("disabled", disabled),
        Job("raw forward", lambda: _forward(model, BATCHES[1])),
    ]
    check_rounds(model, jobs, ROUNDS // 2,
                 extra_check=lambda: "generate left on the model" if "generate" in model.__dict__ else None)


class _Boom(Exception):
    pass


class _RaiseAtStep(StoppingCriteria):
    """A stopping criterion that raises at decode step ``step`` (mid-generate)."""

    def __init__(self, exc: type[BaseException], step: int = 2) -> None:
        self.exc, self.step, self.calls = exc, step, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            raise self.exc("stop")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


class _RaisingStreamer(BaseStreamer):
    """Raises on the first generated token (the streamer gets the prompt first, then one put per token)."""

    def __init__(self, exc: type[BaseException]) -> None:
        self.exc, self.puts = exc, 0

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            raise self.exc("stop")

    def end(self):
        pass


class _RaiseInPrefill:
    """A test hook on one decoder layer that raises in one thread only, at its ``nth`` prefill-length call
    (1: the capture pass, 2: the patched prefill)."""

    def __init__(self, layer: torch.nn.Module, exc: type[BaseException], nth: int) -> None:
        self.exc, self.nth, self.calls, self.thread = exc, nth, 0, None
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if threading.get_ident() != self.thread or args[0].shape[1] == 1:
            return
        self.calls += 1
        if self.calls == self.nth:
            raise self.exc("stop")


@pytest.mark.parametrize("when", ["capture", "prefill", "decode", "streamer"])
def test_an_exception_in_one_thread_leaves_the_others_and_the_model_clean(model, wrappers, when):
    """The raising call is back-patched (plain patches, or contrastive) or a raw ``model.generate``."""
    others = mixed_jobs(model, wrappers)
    expected = [job.run() for job in others]
    layer = model.model.language_model.layers[3]  # reached by the capture pass of both victims (sources 4 and 5)
    victims = [("interpolate", wrappers["interpolate"].generate, BATCHES[0]),
               ("contrastive", wrappers["contrastive"].generate, BATCHES[2]),
               ("raw", model.generate, BATCHES[3])]
    for exc in (_Boom, KeyboardInterrupt):
        for victim_name, generate, batch in victims:
            # a raw call has one prefill and no capture pass: it raises in its only prefill
            nth = 1 if when == "capture" or victim_name == "raw" else 2
            prefill_hook = _RaiseInPrefill(layer, exc, nth) if when in ("capture", "prefill") else None

            def run_victim(generate=generate, batch=batch, prefill_hook=prefill_hook, exc=exc):
                kwargs = dict(GEN)
                if prefill_hook is not None:
                    prefill_hook.thread = threading.get_ident()
                elif when == "decode":
                    kwargs["stopping_criteria"] = StoppingCriteriaList([_RaiseAtStep(exc)])
                else:
                    kwargs["streamer"] = _RaisingStreamer(exc)
                return _generated(generate(**batch, **kwargs))

            try:
                results = run_together([Job("victim", run_victim), *others])
            finally:
                if prefill_hook is not None:
                    prefill_hook.handle.remove()
            assert type(results[0]) is exc, f"{victim_name}/{exc.__name__}: the victim returned {results[0]!r}"
            problems = [p for job, got, want in zip(others, results[1:], expected, strict=True)
                        if (p := difference(job.name, got, want))]
            assert not problems, f"{victim_name}/{exc.__name__}: {problems}"
            assert backpatch.backpatch_hook_count(model) == 0
    for wrapped in wrappers.values():
        assert wrapped.unwrap() is model
    # and every call still gives its sequential answer afterwards
    assert not [p for job, want in zip(others, expected, strict=True) if (p := difference(job.name, job.run(), want))]


def test_plain_calls_nested_in_a_patched_call_of_the_same_thread_are_plain(model, wrappers):
    """The hooks belong to one call, not just one thread: a ``disabled()`` call made from a streamer or a logits
    processor of a back-patched call (same thread) runs plain, and the outer call stays patched."""
    wrapped = wrappers["contrastive"]
    inner_batch = BATCHES[1]
    with wrapped.disabled():
        want_inner = _generated(wrapped.generate(**inner_batch, **GEN))
    want_outer = _generated(wrapped.generate(**BATCHES[0], **GEN))
    inner: list = []

    def nested_plain_call():
        with wrapped.disabled():
            inner.append(_generated(wrapped.generate(**inner_batch, **GEN)))
            inner.append(_forward(wrapped, inner_batch))

    class Streamer(BaseStreamer):
        def put(self, value):  # the first put (the prompt) comes before the prefill: the patch hooks are armed
            if not inner:
                nested_plain_call()

        def end(self):
            pass

    class Processor(LogitsProcessor):
        def __call__(self, input_ids, scores):  # decode: the contrastive hooks stay for the whole call
            nested_plain_call()
            return scores

    out = wrapped.generate(**BATCHES[0], **GEN, streamer=Streamer(),
                           logits_processor=LogitsProcessorList([Processor()]))
    assert difference("outer", _generated(out), want_outer) is None
    want_forward = _forward(model, inner_batch)
    assert len(inner) == 2 * (1 + GEN["max_new_tokens"])
    for i in range(0, len(inner), 2):
        assert difference(f"nested generate {i // 2}", inner[i], want_inner) is None
        assert difference(f"nested forward {i // 2}", inner[i + 1], want_forward) is None
    assert backpatch.backpatch_hook_count(model) == 0


def test_unwrap_waits_for_a_patched_call_in_flight_in_another_thread(model, wrappers):
    wrapped = wrappers["contrastive"]  # contrastive hooks stay on the model for the whole call
    inside, go = threading.Event(), threading.Event()

    class Pause(LogitsProcessor):
        def __call__(self, input_ids, scores):
            inside.set()
            go.wait(timeout=30)
            return scores

    call = threading.Thread(target=lambda: wrapped.generate(**BATCHES[0], **GEN,
                                                            logits_processor=LogitsProcessorList([Pause()])))
    call.start()
    assert inside.wait(timeout=30)
    assert backpatch.backpatch_hook_count(model) > 0  # the call in flight holds its hooks
    unwrapped: list = []
    waiter = threading.Thread(target=lambda: unwrapped.append(_catch(wrappers["add"].unwrap)))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive() and not unwrapped  # waits for the call instead of reporting its hooks as left over
    go.set()
    call.join(timeout=30)
    waiter.join(timeout=30)
    assert unwrapped == [model]
    assert backpatch.backpatch_hook_count(model) == 0


def _catch(fn):
    try:
        return fn()
    except Exception as exc:  # reported to the test's thread
        return exc
