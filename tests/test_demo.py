"""`make run`'s demo: the embedded adapters visibly change the output of one mixed batch served over gRPC."""

import re
import subprocess
import sys


def test_demo_serves_a_mixed_batch():
    result = subprocess.run([sys.executable, "-m", "lorax_server.cli", "demo", "--max-new-tokens", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        if m := re.match(r"\[\s*(\w+)\] (Beautiful is)(.*)$", line):
            lines[m.group(1)] = re.sub(r"\x1b\[[0-9;]*m", "", m.group(3))
    assert set(lines) == {"base", "zen", "shout"}
    assert "better than" in lines["zen"] and "better than" not in lines["base"]
    letters = [c for c in lines["shout"] if c.isalpha()]
    assert sum(c.isupper() for c in letters) > 0.8 * len(letters)
    assert "tokens/s over gRPC" in result.stdout
