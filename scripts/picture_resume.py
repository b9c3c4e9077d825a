#!/usr/bin/env python3
"""Draw one resume of the request-serving Linux guest: the README's picture.

    python3 scripts/linux_guest.py guest1g.img --mem 1G --fill-mib 384
    python3 scripts/picture_resume.py guest1g.img -o docs/resume.png \\
        --qemu-args "-machine pc -accel tcg -cpu max -smp 1 -m 1024M -nodefaults \\
                     -display none -no-reboot -serial null"

Starts a fresh QEMU 10 destination with the request port as its second serial
port, resumes the snapshot into it with ``Resume(trace=True)``, sends
``GET 0 4`` as soon as the guest runs, and draws ``r.report(answer_s=...)``
with :func:`uffdpy.harness.plot.plot_run` (guest memory against time, each page
coloured by who sent it; running and answer marked).  ``--working-set FILE``
replays a recording.  ``--json FILE`` keeps the run.  Needs matplotlib
(``pip install 'uffdpy[plot]'``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from uffdpy.harness.bench_resume import _ask, _request_args  # noqa: E402
from uffdpy.harness.plot import plot_run  # noqa: E402
from uffdpy.resume import QemuProcess, Resume  # noqa: E402


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("snapshot")
    ap.add_argument("-o", "--output", required=True, help="the PNG to write")
    ap.add_argument("--qemu-args", required=True, help="QEMU arguments recreating the machine")
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--request", default="GET 0 4")
    ap.add_argument("--working-set", default=None, metavar="FILE.ws")
    ap.add_argument("--json", default=None, metavar="FILE", help="also keep the run's JSON")
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="uffdpy-picture-")
    req = os.path.join(tmp, "req.sock")
    proc = QemuProcess([args.qemu, *shlex.split(args.qemu_args), *_request_args(req)],
                       paused=False, timeout=args.timeout)
    try:
        with Resume(args.snapshot, qmp=proc.qmp_path, trace=True, timeout=args.timeout,
                    working_set=args.working_set) as r:
            if r.running_after(args.timeout) is None:
                raise SystemExit("uffdpy: error: the guest did not start running")
            answer = _ask(req, args.request, args.timeout)
            answer_s = time.time() - r.connected_at
            r.wait(args.timeout * 4)
            run = r.report(answer_s=round(answer_s, 6), answer=answer)
    finally:
        proc.kill()
        os.rmdir(tmp) if not os.listdir(tmp) else None
    if args.json:
        Path(args.json).write_text(json.dumps(run))
    plot_run(run, args.output, title=f"uffdpy resume of {Path(args.snapshot).name}: "
             f"{args.request!r} answered at {answer_s * 1e3:.0f} ms")
    print(f"{args.output}: answered {answer!r} at {answer_s * 1e3:.0f} ms; "
          f"{run['page_requests']} page requests, completed at "
          f"{run['time_to_complete_s'] * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
