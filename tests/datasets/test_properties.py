"""Property tests of the record format (Hypothesis): the zero-copy record view reads what msgpack reads, and any
bytes at all give a record or a FormatError, never another exception."""
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from datasets import format as fmt

leaves = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | \
    st.text(max_size=40) | st.binary(max_size=300)
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=5), max_leaves=12)
records = st.dictionaries(st.text(max_size=12), values, max_size=8).flatmap(
    lambda extra: st.fixed_dictionaries({"image": st.binary(max_size=70_000), **{k: st.just(v) for k, v in
                                                                                  extra.items() if k != "image"}}))
FAST = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(records)
def test_the_zero_copy_view_reads_what_msgpack_reads(rec):
    packed = msgpack.packb(rec)
    view = fmt._record_view(memoryview(packed))
    assert isinstance(view["image"], memoryview)
    assert {**view, "image": bytes(view["image"])} == msgpack.unpackb(packed)


@FAST
@given(st.binary(max_size=600) | records.map(msgpack.packb).flatmap(
    lambda b: st.tuples(st.integers(0, len(b) - 1), st.integers(0, 255)).map(
        lambda at: b[:at[0]] + bytes([at[1]]) + b[at[0] + 1:])))
@pytest.mark.parametrize("copy", [True, False])
def test_any_bytes_are_a_record_or_a_format_error(copy, data):
    try:
        rec = fmt.unpack_record(data, where="record 7", copy=copy)
    except fmt.FormatError as exc:
        assert str(exc).startswith("record 7")
    else:
        assert set(fmt.RECORD_FIELDS) <= set(rec)
