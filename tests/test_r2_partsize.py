"""The multipart part-size rules, for every size up to 4.9 TiB and around the thresholds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from noded.r2.partsize import MAX_PART, MAX_PARTS, MAX_SINGLE_PUT, MIN_PART, GiB, MiB, TiB, plan_parts


def check(size: int, threshold: int, part_size: int) -> None:
    plan = plan_parts(size, threshold=threshold, part_size=part_size)
    parts = list(plan.parts())
    assert len(parts) == plan.count
    # The parts tile the object exactly, in order.
    assert sum(length for _, _, length in parts) == size
    offsets = [off for _, off, _ in parts]
    assert offsets == sorted(offsets)
    assert [n for n, _, _ in parts] == list(range(1, plan.count + 1))
    if not plan.multipart:
        assert plan.count == 1
        assert size <= MAX_SINGLE_PUT
        return
    assert size >= min(threshold, MAX_SINGLE_PUT)
    assert 2 <= plan.count <= MAX_PARTS
    assert MIN_PART <= plan.part_size <= MAX_PART
    assert plan.part_size >= part_size
    lengths = [length for _, _, length in parts]
    assert all(length == plan.part_size for length in lengths[:-1])  # R2: all but the last are equal
    assert 0 < lengths[-1] <= plan.part_size


@settings(max_examples=500, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=int(4.9 * TiB)),
    threshold=st.integers(min_value=5 * MiB, max_value=5 * GiB),
    part_size=st.integers(min_value=5 * MiB, max_value=5 * GiB),
)
def test_part_plan_rules_hold_for_any_size(size: int, threshold: int, part_size: int) -> None:
    check(size, threshold, part_size)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(min_value=int(4 * TiB), max_value=int(4.9 * TiB)))
def test_huge_files_grow_the_part_size_to_fit_10000_parts(size: int) -> None:
    plan = plan_parts(size, threshold=64 * MiB, part_size=16 * MiB)
    assert plan.multipart and plan.count <= MAX_PARTS
    assert plan.part_size > 16 * MiB
    check(size, 64 * MiB, 16 * MiB)


@pytest.mark.parametrize("delta", [-1, 0, 1])
@pytest.mark.parametrize("threshold", [5 * MiB, 64 * MiB, 5 * GiB])
def test_sizes_around_the_threshold(threshold: int, delta: int) -> None:
    size = threshold + delta
    plan = plan_parts(size, threshold=threshold, part_size=5 * MiB)
    assert plan.multipart == (size >= threshold and size > 5 * MiB)
    check(size, threshold, 5 * MiB)


@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_sizes_around_a_part_boundary(delta: int) -> None:
    size = 3 * 16 * MiB + delta
    plan = plan_parts(size, threshold=16 * MiB, part_size=16 * MiB)
    assert plan.count == (3 if delta <= 0 else 4)
    check(size, 16 * MiB, 16 * MiB)


def test_exactly_10000_parts_then_one_more_mib() -> None:
    size = MAX_PARTS * 16 * MiB
    assert plan_parts(size, threshold=64 * MiB, part_size=16 * MiB).count == MAX_PARTS
    plan = plan_parts(size + 1, threshold=64 * MiB, part_size=16 * MiB)
    assert plan.part_size == 17 * MiB and plan.count <= MAX_PARTS


def test_refuses_objects_r2_cannot_hold() -> None:
    with pytest.raises(ValueError, match="largest object"):
        plan_parts(5 * TiB + 1, threshold=64 * MiB, part_size=16 * MiB)
    with pytest.raises(ValueError, match="part size"):
        plan_parts(100, threshold=64 * MiB, part_size=MiB)
