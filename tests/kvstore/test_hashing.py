from __future__ import annotations

import numpy as np
import pytest
import torch

from kvstore.errors import InvalidInputError
from kvstore.hashing import block_keys, namespace_salt, tokens_to_array


def keys(tokens, ns="a", bt=4):
    return block_keys(tokens_to_array(tokens), bt, namespace_salt(ns, "L", bt))


def test_keys_are_chained_prefix_names():
    a = keys([1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = keys([1, 2, 3, 4, 5, 6, 7, 9])
    assert len(a) == 2 and len(a[0]) == 16
    assert a[0] == b[0] and a[1] != b[1]
    # same second block after a different first block: different key (chained)
    assert keys([0, 2, 3, 4, 5, 6, 7, 8])[1] != a[1]


def test_namespace_salts_every_key():
    assert not set(keys(list(range(16)), "tenant-a")) & set(keys(list(range(16)), "tenant-b"))


def test_token_inputs_agree_across_types():
    lst = list(range(8))
    assert keys(lst) == keys(np.arange(8, dtype=np.int64)) == keys(torch.arange(8))


@pytest.mark.parametrize("bad,msg", [
    ([], "empty"), ([1.5, 2], "ints"), ([True, 2], "ints"), ("abc", "sequence of ints"),
    (torch.ones(2, 2, dtype=torch.long), "1-D"), (torch.ones(3), "integers"), ([2**40], "int32"),
    (5, "sequence of ints"),
])
def test_bad_tokens_are_named(bad, msg):
    with pytest.raises(InvalidInputError, match=msg):
        tokens_to_array(bad)
