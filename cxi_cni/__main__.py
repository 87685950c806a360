"""Run the `cxi` binary from source (`python -m cxi_cni`) and as PyInstaller's entry script."""

import sys

from cxi_cni.main import main

sys.exit(main())
