"""Test-wide settings.

OpenMP threads that spin while idle stall for milliseconds on these 2-vCPU VMs (measured: a
512x1376 GEMV took 7.8 ms with libgomp's default spinning and 0.13 ms with
OMP_WAIT_POLICY=PASSIVE), so the suite runs with passive waiting, as the CLI does. It must be set
before torch loads libgomp, hence here.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
