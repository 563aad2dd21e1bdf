"""Script entry of :mod:`megatron_opsd.convert.verify` (also ``opsd convert``); see its docstring."""
import sys

from megatron_opsd.convert.verify import main

if __name__ == "__main__":
    sys.exit(main())
