"""Library log noise the user cannot act on, silenced before those libraries are imported."""

import logging
import warnings

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional kernel (fetched from the Hub by the
# `kernels` package) is missing; the merge never runs that matmul, so the warning would only confuse.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# PEFT asks transformers a deprecated question while wrapping a model for the checks (transformers 5:
# "`is_gradient_checkpointing` is deprecated"): nothing the user can change.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
