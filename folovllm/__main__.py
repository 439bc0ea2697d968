import sys

from folovllm.entrypoints.cli import main

sys.exit(main())
