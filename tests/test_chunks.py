"""The chunk protocol (anadp.chunks): one backward per chunk of private data."""
import pytest

from anadp.chunks import ChunkProtocol, hand_out


def test_hand_out_numbers_every_chunk_and_marks_only_the_last():
    p = ChunkProtocol()
    seen = [(p.current, p.ends_logical) for _ in p.hand_out(["a", "b", "c"])]
    assert seen == [(1, False), (2, False), (3, True)]
    assert [p.current for _ in p.hand_out(["d"])] == [4]


def test_a_consumer_that_stops_early_leaves_no_logical_batch_open():
    """A loop that breaks after the first of three chunks: the next forward (another loader's batch,
    an evaluation) must not be taken for the middle of the interrupted logical batch."""
    p = ChunkProtocol()
    chunks = p.hand_out(["a", "b", "c"])
    next(chunks)
    assert not p.ends_logical
    chunks.close()
    assert p.ends_logical


def test_accept_refuses_data_not_handed_out_and_a_second_backward():
    p = ChunkProtocol()
    with pytest.raises(RuntimeError, match="did not come from the private data loader"):
        p.accept(None)
    first = p.begin()
    p.accept(first)
    with pytest.raises(RuntimeError, match="second backward pass"):
        p.accept(first)
    p.accept(p.begin())


def test_without_a_protocol_the_chunks_pass_unchanged():
    assert list(hand_out(None, ["a", "b"])) == ["a", "b"]
