"""Library log noise the user cannot act on, silenced before those libraries are imported."""

import logging

# bitsandbytes warns at import on AVX512-BF16 CPUs that an optional kernel (fetched from the Hub by the
# `kernels` package) is missing; the merge never runs that matmul, so the warning would only confuse.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
