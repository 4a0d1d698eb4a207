"""The thread trap: the encoding passes run with one torch thread, and restore the count."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch

from lightning_secagg import encoding
from lightning_secagg.encoding import (
    Schema,
    check_values,
    decode_result,
    decode_total,
    encode,
    magnitude_exponents,
)
from lightning_secagg.threads import single_threaded, single_threaded_pass


@pytest.fixture
def two_threads() -> Iterator[None]:
    """torch's count at 2 for the test (as torch's default on a 2-core host), then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Watching(Mapping[str, torch.Tensor]):
    """A state dict that records torch's thread count whenever a pass reads a tensor."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.seen: list[int] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def items(self):  # type: ignore[override]
        for key in self.tensors:
            yield key, self[key]


def test_single_threaded_sets_one_and_restores(two_threads):
    with single_threaded():
        assert torch.get_num_threads() == 1
        with single_threaded():  # re-entrant: the inner exit restores nothing
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_single_threaded_restores_after_an_exception(two_threads):
    with pytest.raises(ValueError), single_threaded():
        raise ValueError("boom")
    assert torch.get_num_threads() == 2


def test_single_threaded_keeps_a_count_changed_meanwhile(two_threads):
    with single_threaded():
        torch.set_num_threads(3)  # someone else's choice, made inside: kept
    assert torch.get_num_threads() == 3


def test_overlapping_threads_each_run_on_one_thread_and_get_their_count_back(two_threads):
    inside, release = threading.Barrier(2, timeout=10), threading.Event()
    other_seen: list[int] = []

    def other() -> None:
        with single_threaded():
            other_seen.append(torch.get_num_threads())
            inside.wait()
            release.wait(timeout=10)
            other_seen.append(torch.get_num_threads())

    t = threading.Thread(target=other)
    t.start()
    try:
        with single_threaded():
            inside.wait()
            mine = torch.get_num_threads()
    finally:
        release.set()
        t.join(timeout=10)
    assert not t.is_alive()
    assert mine == 1
    assert other_seen == [1, 1]  # this thread left first: the other one stayed at one
    assert torch.get_num_threads() == 2


def test_decorator_keeps_the_name_and_result():
    @single_threaded_pass
    def count(x: int) -> int:
        """Doc."""
        return torch.get_num_threads() + x

    assert count(10) == 11
    assert count.__name__ == "count" and count.__doc__ == "Doc."


def test_every_encoding_pass_runs_on_one_thread(two_threads, monkeypatch):
    # float16 goes through torch in decode_total (numpy converts float32 itself).
    tensors = {
        "w": torch.linspace(-1, 1, 3 * encoding.ENCODE_CHUNK + 5),
        "h": torch.linspace(-1, 1, 77, dtype=torch.float16),
    }
    state = Watching(tensors)
    schema = Schema.of(tensors)
    magnitude_exponents(state)
    check_values(state)
    vec = encode(state, schema, 1.0, checked=True)
    assert state.seen and set(state.seen) == {1}
    # decode_total and decode_result read no state dict: watch torch inside them.
    seen: list[int] = []
    real_from_numpy = torch.from_numpy

    def watching_from_numpy(a: np.ndarray) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        return real_from_numpy(a)

    monkeypatch.setattr(torch, "from_numpy", watching_from_numpy)
    out = decode_total(vec, schema)
    assert seen and set(seen) == {1}
    seen.clear()
    real_empty = torch.empty

    def watching_empty(*args, **kwargs) -> torch.Tensor:  # decode_result's one torch call
        seen.append(torch.get_num_threads())
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", watching_empty)
    result = decode_result(out, schema)
    assert seen and set(seen) == {1}
    monkeypatch.undo()
    assert torch.get_num_threads() == 2
    assert torch.equal(result["h"], tensors["h"])
    assert torch.allclose(result["w"], tensors["w"])
