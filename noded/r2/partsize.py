"""How an object is cut into multipart parts: pure arithmetic, no I/O.

R2 (like S3) wants every part but the last to have the same size, between 5 MiB and 5 GiB, and at most
10,000 parts. The part size therefore follows from the file size: the configured size, grown (in whole
MiB) just enough that the parts fit into 10,000.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
MIN_PART = 5 * MiB
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
MAX_SINGLE_PUT = 5 * GiB
MAX_OBJECT = 5 * TiB
ALIGN = MiB  # round part sizes up to whole MiB: readable, and page-aligned reads


@dataclass(frozen=True, slots=True)
class PartPlan:
    size: int
    part_size: int  # equals size for a single PUT
    count: int  # 1 for a single PUT
    multipart: bool

    def parts(self) -> Iterator[tuple[int, int, int]]:
        """(part number from 1, offset, length) for each part."""
        for i in range(self.count):
            offset = i * self.part_size
            yield i + 1, offset, min(self.part_size, self.size - offset)


def plan_parts(size: int, *, threshold: int, part_size: int) -> PartPlan:
    """A single PUT below `threshold`, else equal parts of at least `part_size` bytes."""
    if size < 0:
        raise ValueError(f"negative size {size}")
    if size > MAX_OBJECT:
        raise ValueError(f"{size} bytes is larger than the largest object R2 accepts ({MAX_OBJECT} bytes)")
    if not MIN_PART <= part_size <= MAX_PART:
        raise ValueError(f"part size {part_size} is outside {MIN_PART}..{MAX_PART}")
    if size < min(threshold, MAX_SINGLE_PUT):
        return PartPlan(size, size, 1, False)
    need = -(-size // MAX_PARTS)  # smallest part size that fits in MAX_PARTS parts
    chosen = max(part_size, need, MIN_PART)
    chosen = -(-chosen // ALIGN) * ALIGN
    chosen = min(chosen, MAX_PART)
    count = -(-size // chosen)
    if count <= 1 and size <= MAX_SINGLE_PUT:
        return PartPlan(size, size, 1, False)
    return PartPlan(size, chosen, count, True)
