"""The model zoo: importing this package registers every family (one module per family)."""

from edgevit.models import mobilevit_v2, vit  # noqa: F401
