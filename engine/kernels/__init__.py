"""Fused Triton kernels that replace chains of small elementwise ops inside transformers' modules.

A decode step of a small model is a long row of tiny kernels: transformers' RMSNorm alone is six
of them, its rotary embedding ten per layer. Inside a CUDA graph their launch cost is gone, but
each still costs a few microseconds of GPU time; fusing them is what is left to win.
"""
