"""Wire-format helpers: tensors as frames, error codes both ways, header checks."""

from __future__ import annotations

import pytest
import torch
import zmq

from kvstore import BlockNotFoundError, ConfigError, InvalidInputError, StoreClosedError
from kvstore.sidecar.protocol import (CODE_TO_ERROR, LayoutMismatchError, ProtocolError, SidecarError, UnknownOpError,
                              VersionMismatchError, check_header, error_code, error_from_reply, pack,
                              parse_request, tensor_desc, tensor_frame, tensor_from_frame)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_tensor_roundtrip_through_a_zmq_frame_without_copy(dtype):
    t = torch.randn(2, 2, 5, 3, 4).to(dtype)
    frame = zmq.Frame(tensor_frame(t))
    back = tensor_from_frame(frame, tensor_desc(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back.view(torch.uint8), t.view(torch.uint8))
    assert back.untyped_storage().data_ptr() == back.data_ptr()  # a view over the frame


def test_non_contiguous_tensor_is_sent_in_logical_order():
    t = torch.arange(24, dtype=torch.float32).view(2, 3, 4).transpose(0, 2)
    back = tensor_from_frame(tensor_frame(t), tensor_desc(t))
    assert torch.equal(back, t)


def test_misaligned_buffer_is_copied_not_rejected():
    raw = bytearray(1 + 8)
    buf = memoryview(raw)[1:]
    back = tensor_from_frame(buf, {"dtype": "float32", "shape": [2]})
    assert back.shape == (2,)


@pytest.mark.parametrize("desc, exc", [
    ({"dtype": "float16", "shape": [3]}, ProtocolError),  # 6 bytes for an 8-byte frame
    ({"dtype": "nope", "shape": [4]}, InvalidInputError),
    ({"dtype": "float16"}, InvalidInputError),
    ({"dtype": "float16", "shape": [True, 4]}, InvalidInputError),
    ([1, 2], InvalidInputError),
])
def test_bad_tensor_descriptors(desc, exc):
    with pytest.raises(exc):
        tensor_from_frame(b"\0" * 8, desc)


@pytest.mark.parametrize("exc, code", [
    (InvalidInputError("x"), "invalid_argument"), (BlockNotFoundError("x"), "not_found"),
    (ConfigError("x"), "config"), (StoreClosedError("x"), "closed"), (NotImplementedError("x"), "not_implemented"),
    (LayoutMismatchError("x"), "layout_mismatch"), (UnknownOpError("x"), "unknown_op"),
    (RuntimeError("x"), "internal"),
])
def test_error_codes_map_back_to_the_same_class(exc, code):
    assert error_code(exc) == code
    back = error_from_reply({"code": code, "message": "boom"})
    assert type(back) is (type(exc) if code != "internal" else SidecarError)
    assert str(back) == "boom"


def test_every_code_has_a_class_and_unknown_codes_stay_remote_errors():
    assert all(isinstance(error_from_reply({"code": c, "message": "m"}), Exception) for c in CODE_TO_ERROR)
    e = error_from_reply({"code": "brand_new", "message": "m"})
    assert isinstance(e, SidecarError) and e.code == "brand_new"
    assert isinstance(error_from_reply("garbage"), ProtocolError)


def test_header_checks():
    assert check_header({"v": 1, "id": 3, "op": "lookup", "args": {"a": 1}, "deadline_ms": 250}) == \
        ("lookup", {"a": 1}, 0.25)
    with pytest.raises(VersionMismatchError, match="speaks v1"):
        check_header({"v": 2, "op": "lookup"})
    with pytest.raises(UnknownOpError):
        check_header({"v": 1, "op": "drop_tables"})
    with pytest.raises(ProtocolError):
        parse_request([b"KVS1"])
    with pytest.raises(ProtocolError):
        parse_request([b"KVS1", pack([1])])
