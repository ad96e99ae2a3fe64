"""pytest plugin of the device check's test step (`-p benchmarks.test_outcomes`): every test's
outcome as one JSON line the moment it is known (a step killed at its deadline keeps them), the
tests collected, and, past the step's deadline, every test not yet started skipped with that
reason instead of run.

  FASTDIT_TEST_LOG        the JSON-lines file to append to
  FASTDIT_BENCH_DEADLINE  the Unix time after which no test starts
"""

import json
import os
import time

import pytest

OUT_OF_TIME = "skipped: the time budget ran out before this test"
MESSAGE_LINES = 6  # of a failure's "E   ..." lines kept


_CONFIG = []


def pytest_configure(config):
    _CONFIG[:] = [config]


def _log(record):
    path = os.environ.get("FASTDIT_TEST_LOG")
    if path and not hasattr(_CONFIG[0], "workerinput"):  # under xdist only the controller writes
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    _log({"collected": [item.nodeid for item in session.items]})


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    _log({"collected": list(ids)})


def pytest_runtest_setup(item):
    if time.time() > float(os.environ.get("FASTDIT_BENCH_DEADLINE") or "inf"):
        pytest.skip(OUT_OF_TIME)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    if report.when == "call" or report.outcome != "passed":
        outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
        _log(
            {
                "test": report.nodeid,
                "outcome": outcome,
                "seconds": round(report.duration, 2),
                "message": _message(report),
            }
        )


def _message(report):
    if report.outcome == "passed":
        return None
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2].removeprefix("Skipped: ")
    text = report.longreprtext
    errors = [line for line in text.splitlines() if line.startswith("E ")][:MESSAGE_LINES]
    return "\n".join(errors) if errors else text[-600:]
