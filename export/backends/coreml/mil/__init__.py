"""A reference executor for Core ML ML Programs: run a saved .mlpackage op by op in numpy (fp32 and
fp16 modes) so Core ML artifacts are verified on machines without Core ML. See :mod:`.executor`."""

from edgevit.export.backends.coreml.mil import ops_math, ops_nn, ops_quant, ops_tensor  # noqa: F401  (op table)
from edgevit.export.backends.coreml.mil.executor import (  # noqa: F401
    MODES, MILExecutor, MILProgram, load_program, round_fp16,
)
from edgevit.export.backends.coreml.mil.fp16_report import Fp16RangeObserver, fp16_range_report  # noqa: F401
from edgevit.export.backends.coreml.mil.registry import OPS, UnsupportedOpError  # noqa: F401
