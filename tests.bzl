"""pytest_test: one py_test per test file, run through pytest."""

def pytest_test(name, src, support, deps, size = "medium"):
    native.py_test(
        name = name,
        size = size,
        srcs = ["tests/bazel_pytest.py", src] + support,
        main = "tests/bazel_pytest.py",
        args = ["$(location %s)" % src],
        data = native.glob(["configs/*.flags"]) + ["setup.cfg"],
        python_version = "PY3",
        deps = deps,
    )
