"""edgevit.export: capture with torch.export, convert per target, check parity, write manifests.

The targets table (:mod:`edgevit.export.targets`) drives everything here.
"""

from edgevit.export.targets import PRECISIONS, TARGETS, Target, get_target  # noqa: F401
