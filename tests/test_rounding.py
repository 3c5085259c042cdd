"""What "rounded once" means here: torch's float64 -> 16-bit conversion, which goes through float32.

README states the consequence (a value within half a float32 step of an output midpoint is rounded twice);
this test pins it, so a torch that starts rounding float64 correctly makes it, and that README line, change.
That the merge equals a float64 reference rounded this way, bit for bit, is tests/test_merge_engine.py's.
"""

from __future__ import annotations

import torch


def test_torch_rounds_float64_to_16_bit_through_float32() -> None:
    just_above_a_bf16_midpoint = torch.tensor([1 + 2**-8 + 2**-30], dtype=torch.float64)
    assert just_above_a_bf16_midpoint.to(torch.bfloat16).item() == 1.0  # correctly rounded: 1.0078125
    just_above_an_fp16_midpoint = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert just_above_an_fp16_midpoint.to(torch.float16).item() == 1.0  # correctly rounded: 1.0009765625
