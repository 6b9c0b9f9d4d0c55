"""`python -m hello_fast` is the `hello-fast` command."""
import sys

from hello_fast.cli import main

sys.exit(main())
