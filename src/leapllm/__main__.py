import sys

from leapllm.cli.main import main

sys.exit(main())
