"""Script entry of :mod:`megatron_opsd.convert.hf_to_megatron` (also ``opsd convert``); see its docstring."""
import sys

from megatron_opsd.convert.hf_to_megatron import main

if __name__ == "__main__":
    sys.exit(main())
