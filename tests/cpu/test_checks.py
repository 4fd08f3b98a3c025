"""The one integer-argument check and the one round-up (dwdp_comm.checks)."""
import numpy as np
import pytest
import torch

import dwdp_comm as dc
from dwdp_comm.checks import align_up, check_int


@pytest.mark.parametrize("value", [0, 7, np.int64(7), np.uint8(3), torch.tensor(5)])
def test_integers_pass_as_python_ints(value):
    got = check_int("n", value, low=0)
    assert type(got) is int and got == int(value)


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, torch.tensor([1, 2]), torch.tensor(1.5),
                                   np.float32(2)])
def test_non_integers_are_a_type_error_naming_the_argument(value):
    with pytest.raises(dc.InvalidTypeError, match=r"^depth: got an object of type \w+, expected an int$"):
        check_int("depth", value, low=1)


@pytest.mark.parametrize("value, low, high, expected", [
    (0, 1, None, "an int >= 1"), (-1, 0, None, "an int >= 0"), (4, 0, 3, r"an int in \[0, 4\)"),
    (9, None, 8, "an int <= 8"),
])
def test_out_of_bounds_is_a_value_error_naming_the_bounds(value, low, high, expected):
    with pytest.raises(dc.InvalidArgumentError, match=rf"^rank: got {value}, expected {expected}$"):
        check_int("rank", value, low=low, high=high)
    assert check_int("rank", low if low is not None else high, low=low, high=high) in (low, high)


def test_the_message_may_say_what_was_expected():
    with pytest.raises(dc.InvalidArgumentError, match=r"^chunk_nbytes: got 0, expected an int > 0$"):
        check_int("chunk_nbytes", 0, low=1, expected="an int > 0")


@pytest.mark.parametrize("n, a, want", [(0, 4096, 0), (1, 4096, 4096), (4096, 4096, 4096), (4097, 4096, 8192),
                                        (5, 3, 6), (2 << 20, 2 << 20, 2 << 20), ((2 << 20) + 1, 2 << 20, 4 << 20)])
def test_align_up(n, a, want):
    assert align_up(n, a) == want


def test_align_up_against_its_definition():
    rng = np.random.default_rng(0)
    for n, a in rng.integers(1, 1 << 40, size=(200, 2)):
        got = align_up(int(n), int(a))
        assert got % a == 0 and n <= got < n + a
