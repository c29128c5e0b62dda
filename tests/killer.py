"""Run the fedml CLI and SIGKILL this very process at the n-th call of one function.

    python tests/killer.py MODULE:ATTR N before|after -- [fedml arguments...]

`tests/test_kill.py` uses it to die at chosen moments (inside training, aggregation,
evaluation or a commit) without any test hook in the product code. ATTR may be dotted
(`WeightedMean.add`, `shutil.rmtree`); patch the name where it is looked up at call time.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def arm(target: str, n: int, when: str) -> None:
    """Replace `target` with a wrapper that kills the process at its n-th call."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    original: Callable = getattr(owner, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == n and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    target, n, when, separator, *fedml_args = sys.argv[1:]
    assert separator == "--" and when in ("before", "after")
    arm(target, int(n), when)
    from fedml.cli import main

    sys.argv = ["fedml", *fedml_args]
    main()
