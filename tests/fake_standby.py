"""A standby filler process against the stand-in libcuda (tests start it in place of
`python -m snapscale.workload.standby`): the memory it exports is a memfd that holds the bytes it
filled, so a test in another process can read what it was handed."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from workload_helpers import FakeDeviceLib

from snapscale.workload import standby


class ExportingLib(FakeDeviceLib):
    def cuMemExportToShareableHandle(self, out: Any, handle: Any, kind: int, flags: Any) -> int:
        rc = super().cuMemExportToShareableHandle(out, handle, kind, flags)
        os.write(out._obj.value, bytes(self.memory.get(handle.value, b"")))
        return rc

    def cuMemcpyHtoD_v2(self, dst: Any, src: Any, n: Any) -> int:
        print(json.dumps({"copy": n.value}), flush=True)  # the test follows the fill by these
        return super().cuMemcpyHtoD_v2(dst, src, n)


if __name__ == "__main__":
    rc = standby.main(lib=ExportingLib())
    hold = os.environ.get("FAKE_STANDBY_HOLD_EXIT")  # a test's file: exit only once it exists
    while hold and not os.path.exists(hold):
        time.sleep(0.01)
    sys.exit(rc)
