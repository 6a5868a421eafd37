# Triton kernels are tested on CPU through the Triton interpreter. TRITON_INTERPRET must be set
# before any @triton.jit function is defined (i.e. before a kernels.*_triton module is imported),
# so it is set here, at conftest import time, ahead of every test module.
import os; os.environ.setdefault("TRITON_INTERPRET", "1")
