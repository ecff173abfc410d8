"""The toolkit's shared library (README.md, "Code map", says what each module holds)."""
import logging
import warnings

# bitsandbytes logs, at import on CPUs with AVX512-BF16, that its optional fused CPU 4-bit kernel
# (the `kernels` package) is missing. The toolkit never uses that path (utils.models.
# portable_cpu_4bit keeps 4-bit layers on the portable one), so the line is noise on every
# command's stderr, where our errors must stand alone as one line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# peft 0.21's get_peft_model reads transformers' `is_gradient_checkpointing`, which transformers
# 5.x deprecates with a FutureWarning on every wrap (every qlora.py and spul.py run). Not ours to
# act on; the message is filtered by its exact text so that any other warning still shows.
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

# MKL's strict reproducibility mode, before any matrix product runs: the same bits at every
# --threads (utils/invariant.py). Set here because MKL fixes its mode at its first call.
from utils.invariant import strict_blas  # noqa: E402

strict_blas()
