"""`make demo` (`python -m demo`): the whole system end to end on 2 CPU cores, composed of the
library and the command-line tools; see demo/driver.py for the steps."""
