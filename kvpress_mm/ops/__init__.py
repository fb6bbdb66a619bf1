"""Pure tensor code: what a strategy works with and the kernels it calls. Imports nothing from transformers."""
