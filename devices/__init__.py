"""edgevit.devices: measuring exported artifacts (runners for parity, the bench harness, remote devices)."""

from edgevit.devices.runtimes import Runner, load_runner  # noqa: F401
