"""Triton kernels and their launchers (installed as fastdin.kernels). No autograd, no modules here."""
