"""Shared pytest wiring. Fixtures live in tests/fixtures/, one module per real component."""

pytest_plugins = [
    "tests.fixtures.engine",
    "tests.fixtures.envoy",
    "tests.fixtures.kube",
]
