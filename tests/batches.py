"""Helpers shared by the data tests: take batches from a stream, compare batch lists exactly."""
import torch


def take(stream, n: int) -> list:
    """The next ``n`` (inputs, labels) batches, then close the stream (stops its workers)."""
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    stream.close()
    return out


def assert_same(a: list, b: list) -> None:
    """Two lists of (inputs, labels) batches are identical, element for element."""
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b, strict=True):
        torch.testing.assert_close(x1, x2, rtol=0, atol=0)
        torch.testing.assert_close(y1, y2, rtol=0, atol=0)
