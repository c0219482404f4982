import sys

from demo.driver import main

sys.exit(main())
