"""The toolkit's shared library (see README.md for the map of its modules)."""
import logging

# bitsandbytes logs, at import on CPUs with AVX512-BF16, that its optional fused CPU 4-bit kernel
# (the `kernels` package) is missing. The toolkit never uses that path (utils.models.
# portable_cpu_4bit keeps 4-bit layers on the portable one), so the line is noise on every
# command's stderr, where our errors must stand alone as one line.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
