"""``compactvl.hardware``: the machine description that ``compactvl bench`` and ``compactvl demo`` put beside their
numbers."""
import os

import torch

from compactvl.hardware import cpu_name, has_amx, loadavg, machine


def test_machine_describes_this_process():
    m = machine()
    assert set(m) == {"platform", "python", "torch", "cpu", "cpu_count", "torch_threads", "gpu"}
    assert m["cpu_count"] == os.cpu_count() and m["torch_threads"] == torch.get_num_threads()
    assert m["torch"] == torch.__version__ and isinstance(m["cpu"], str)
    assert (m["gpu"] is None) == (not torch.cuda.is_available())
    name = cpu_name()
    assert name is None or (isinstance(name, str) and name == m["cpu"])
    assert isinstance(has_amx(), bool)


def test_loadavg_is_three_rounded_numbers_or_none():
    la = loadavg()
    if hasattr(os, "getloadavg"):
        assert len(la) == 3 and all(x >= 0 and round(x, 2) == x for x in la)
    else:
        assert la is None
