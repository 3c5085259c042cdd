"""One model built at a time in this process.

transformers sets torch's default dtype process-wide while it builds a model (``local_torch_dtype`` in
``from_pretrained``/``from_config``), and PEFT creates the adapter's layers at whatever the default is then.
Two requests building models at once on the app's threads would build each other's layers in the wrong dtype
(seen: a float32 input meeting bfloat16 weights, and silently a bfloat16 reference). Every model build in
merge_core holds this lock; forward passes do not need it.
"""

from __future__ import annotations

import threading

_BUILDING = threading.RLock()


def building_models() -> threading.RLock:
    """The lock to hold around from_pretrained / from_config / PeftModel.from_pretrained (re-entrant)."""
    return _BUILDING
