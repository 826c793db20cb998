"""engine/backends/cuda/host_copies.py (plain numpy: runs without a GPU)."""

import numpy as np
import pytest

from engine.backends.cuda import host_copies


@pytest.mark.parametrize("size", [0, 1, 1000, host_copies.PIECE_MIN // 4 * 3 + 7])
def test_copy_in_pieces_equals_the_source(size, monkeypatch):
    monkeypatch.setattr(host_copies, "THREADS", 4)
    src = np.random.default_rng(size).random(size, dtype=np.float32).reshape(-1, 1)
    dst = np.zeros_like(src)
    assert host_copies.copy(dst, src) is dst
    np.testing.assert_array_equal(dst, src)
