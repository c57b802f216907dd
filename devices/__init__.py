"""edgevit.devices: runtimes that execute exported artifacts (the latency harness grows here)."""

from edgevit.devices.runtimes import RUNNERS, Runner, load_runner  # noqa: F401
