"""What a saved variant needs to run: packed linear layers and their kernels, the packed KV cache,
module helpers. Below loading and measuring; never imports a technique."""
