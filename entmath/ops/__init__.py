"""The public ops.  Each module holds one math idea: its torch reference path, its autograd
Function with a derived backward, and the dispatch to the Triton kernel in ``entmath/kernels``."""
