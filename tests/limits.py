"""How long a test waits on a subprocess, a server or a request before it calls it hung.

Only a hang may fail a test, never a slow or busy machine: the bound is far above any wait in the suite on a loaded
2-core machine (the slowest, a scored run of 1,500 rows, takes about a minute there).
"""

HANG_S = 1800
