import sys

from vllm_overlay.report import main

sys.exit(main())
