from bcssl.cli import main
import sys

sys.exit(main())
