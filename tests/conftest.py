"""Suite-wide settings. The engine launches decode steps ahead on a GPU only (on a CPU a step launched ahead
would be computed before the call answers); the suite runs on CPUs, so it turns them on to exercise that path
everywhere, in process and in the servers it starts. Tests that compare with steps launched in turn set
`engine.decode_ahead = False` themselves."""

import os

os.environ.setdefault("LORAX_DECODE_AHEAD", "1")
