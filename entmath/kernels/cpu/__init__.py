"""C kernels of the CPU fast paths (``*.c`` next to their ctypes wrappers), compiled on first use."""
