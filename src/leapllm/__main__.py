import sys

from leapllm.cli.main import run

sys.exit(run())
