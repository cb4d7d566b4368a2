"""pytest_test: one py_test per test file, run through pytest.

FAST and SLOW are the one definition of which test files are slow: BUILD sizes
SLOW files "large", and tests/conftest.py marks every test in them `slow`, which
`make test-fast` (pytest -m "not slow") skips.
"""

FAST = [
    "strategy",
    "gates",
    "template",
    "backbones",
    "analysis",
    "data",
    "convert",
    "stack",
    "training",
    "protocols",
    "recipe",
    "cost",
    "evaluation",
    "augment",
    "fusion",
    "api",
]

SLOW = [
    "main",
    "inflation",
    "warmup",
    "export",
    "end_to_end",
    "distributed",
    "faults",
    "tensorboard",
    "losses",
    "tflite",
    "compute",
    "memory",
]

def pytest_test(name, src, support, deps, size = "medium"):
    native.py_test(
        name = name,
        size = size,
        srcs = ["tests/bazel_pytest.py", src] + support,
        main = "tests/bazel_pytest.py",
        args = ["$(location %s)" % src],
        data = native.glob(["configs/*.flags"]) + ["setup.cfg", "tests.bzl"],
        python_version = "PY3",
        deps = deps,
    )
