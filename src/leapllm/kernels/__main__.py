import sys

from leapllm.kernels import main

sys.exit(main())
