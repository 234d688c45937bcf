"""Test-only fault injection: make the process kill itself at a named point, to prove crashes lose nothing.

``VISIONTUNE_FAULT=POINT:COUNT[:SIGNAL]`` sends SIGNAL (default KILL; INT for a Ctrl-C) to this process the
COUNT-th time it reaches POINT. Points: ``step`` (after a training step and its checkpoint), ``validate``
(before validation; in detection, between the validation predictions and their COCO evaluation), ``features``
(before the feature cache), ``finish`` (before the final files),
``write`` (any atomic file write, after the temporary file is half written and before it is renamed),
``write-model`` / ``write-last`` (only writes of model.safetensors / last.safetensors).
Unset (always, outside tests) it costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_counts: Counter = Counter()


def fault_point(*names: str, before_kill=None) -> None:
    spec = os.environ.get("VISIONTUNE_FAULT")
    if not spec:
        return
    point, count, *sig = spec.split(":")
    if point not in names:
        return
    _counts[point] += 1
    if _counts[point] == int(count):
        signum = getattr(signal, "SIG" + (sig[0] if sig else "KILL"))
        if before_kill is not None and signum == signal.SIGKILL:
            before_kill()
        os.kill(os.getpid(), signum)
