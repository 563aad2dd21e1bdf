"""Script entry of :mod:`megatron_opsd.convert.megatron_to_hf` (also ``opsd convert``); see its docstring."""
import sys

from megatron_opsd.convert.megatron_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
