"""Reading XLA's optimized HLO text in tests."""

from __future__ import annotations

import re


def compiled_dots(hlo: str) -> list[tuple[str, str, str, int]]:
    """(lhs, rhs, result element type, result's last dimension) of every dot of an optimized HLO module's
    text. Instruction names are unique in a module, so operands are looked up among all `%name = type[`."""
    types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
    dots = re.findall(r"= (\w+)\[(?:[\d,]*,)?(\d+)\][^=]* dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
    return [(types[lhs], types[rhs], result, int(last)) for result, last, lhs, rhs in dots]
